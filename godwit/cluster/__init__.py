"""Cluster mode: hosts, container ownership and migration records in etcd v3."""
