"""godwit: live migration of running runC containers between Linux hosts, using CRIU."""

__version__ = "0.1.0"
