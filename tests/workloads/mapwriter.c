/* mapwriter FILE: count for ever in the first 8 bytes of FILE, mapped shared and writable.
 *
 * Every 10 ms the count goes up by one, in the mapping and in private memory. Once a page
 * of a shared mapping is writable, writes through it change neither the file's mtime nor
 * its ctime (only the fault that made it writable did), so a copy of the file taken by
 * those is missing them. If the mapping ever disagrees with the private count (the file
 * under it is an older copy), mapwriter says so on stderr and exits 1. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const struct timespec tick = { 0, 10 * 1000 * 1000 };
	volatile uint64_t *mapped;
	uint64_t count = 0;
	int fd;

	if (argc != 2) {
		fprintf(stderr, "usage: mapwriter FILE\n");
		return 2;
	}
	fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || ftruncate(fd, 4096)) {
		perror(argv[1]);
		return 2;
	}
	mapped = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mapped == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	for (;;) {
		if (*mapped != count) {
			fprintf(stderr, "mapwriter: the mapping holds %llu, not %llu\n",
				(unsigned long long)*mapped, (unsigned long long)count);
			return 1;
		}
		*mapped = ++count;
		nanosleep(&tick, NULL);
	}
}
