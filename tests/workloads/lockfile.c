/* lockfile FILE: take flock(FILE) and hold it until killed.
 * lockfile -n FILE: exit 0 if the lock is free (taking and dropping it), 1 if held. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int try_only = argc == 3 && !strcmp(argv[1], "-n");
	const char *path = argv[argc - 1];
	int fd;

	if (argc != 2 && !try_only) {
		fprintf(stderr, "usage: lockfile [-n] FILE\n");
		return 2;
	}
	fd = open(path, O_RDWR | O_CREAT, 0666);
	if (fd < 0 || flock(fd, LOCK_EX | (try_only ? LOCK_NB : 0)))
		return 1;
	if (try_only)
		return 0;
	for (;;)
		pause();
}
