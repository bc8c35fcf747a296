/*
 * memhog: a live-migration test workload for godwit.
 *
 *   memhog MIB SEED STATE [DIRTY_PAGES_PER_SEC [PROTECTED_MIB [HOLE_MIB]]]
 *
 * Allocates MIB MiB and fills every 8-byte word with a pseudo-random value derived
 * from SEED (nothing is zero, duplicated or compressible), computes a 64-bit checksum
 * and writes STATE (tmp file + rename) as
 *
 *   ready mib=M seed=S checksum=C expected=E dirtied=D counter=N
 *
 * Then, every 10 ms, it increments an in-memory counter and rewrites STATE. It also
 * rewrites DIRTY_PAGES_PER_SEC (default 10, 0 = constant buffer) random pages per
 * second with new content and keeps the expected checksum up to date incrementally
 * (checksum = sum over pages of hash(page index, page content), mod 2^64), so a
 * migration that loses a dirty page is detected.
 *
 * With PROTECTED_MIB, the last PROTECTED_MIB of the buffer are mprotect()ed PROT_NONE
 * once filled (never dirtied, readable only while a verification reads them), as a JIT
 * or a guard region would be: a checkpointer must still carry their content.
 *
 * With HOLE_MIB, that many MiB in the middle of the buffer are given back once filled
 * (madvise MADV_DONTNEED: they read as zeros and use no memory) and are part of the
 * checksum as zeros: a checkpointer must not turn them into real memory.
 *
 * SIGUSR1 recomputes the checksum over the whole buffer; from then on STATE reads
 *
 *   verified mib=M seed=S checksum=RECOMPUTED expected=E ok=0|1 verifications=V
 *            dirtied=D counter=N
 *
 * (one line; checksum/expected/ok as of the last verification). SIGTERM/SIGINT exit 0
 * (needed: as PID 1 of a pid namespace, default-disposition signals are ignored).
 * No fds stay open between writes and stdio is not used, so CRIU can dump it anytime.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096UL
#define PAGE_WORDS (PAGE_SIZE / sizeof(uint64_t))
#define TICK_NS 10000000L
#define TICKS_PER_SEC 100

static volatile sig_atomic_t verify_requested;
static volatile sig_atomic_t stop_requested;

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint64_t mix(uint64_t x)
{
	return splitmix64(&x);
}

/* Content of page i in its generation gen (0 = initial fill). */
static void fill_page(uint64_t *p, uint64_t seed, uint64_t i, uint64_t gen)
{
	uint64_t s = mix(seed ^ mix(i ^ mix(gen)));
	for (size_t j = 0; j < PAGE_WORDS; j++)
		p[j] = splitmix64(&s);
}

static uint64_t page_hash(const uint64_t *p, uint64_t i)
{
	uint64_t h = 0xcbf29ce484222325ULL ^ i;
	for (size_t j = 0; j < PAGE_WORDS; j++) {
		h = (h ^ p[j]) * 0x100000001b3ULL;
		h ^= h >> 29;
	}
	return mix(h + i);
}

static uint64_t checksum(const uint64_t *buf, size_t npages)
{
	uint64_t sum = 0;
	for (size_t i = 0; i < npages; i++)
		sum += page_hash(buf + i * PAGE_WORDS, i);
	return sum;
}

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		verify_requested = 1;
	else
		stop_requested = 1;
}

static int write_state(const char *path, const char *line)
{
	char tmp[4096];
	size_t len = strlen(line);
	int fd;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return -1;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	if (write(fd, line, len) != (ssize_t)len) {
		close(fd);
		return -1;
	}
	close(fd);
	return rename(tmp, path);
}

struct hog {
	uint64_t *buf;
	size_t npages, protected_pages;
	unsigned long mib;
	uint64_t seed, rng, generation;
	uint64_t expected, checksum, verified_expected;
	uint64_t counter, dirtied, verifications;
	int verified, ok;
};

static void dirty_one(struct hog *h)
{
	uint64_t i = splitmix64(&h->rng) % (h->npages - h->protected_pages);
	uint64_t *p = h->buf + i * PAGE_WORDS;
	uint64_t old = page_hash(p, i);

	fill_page(p, h->seed, i, ++h->generation);
	h->expected += page_hash(p, i) - old;
	h->dirtied++;
}

/* The protected tail: PROT_NONE, or readable for a verification. */
static void protect_tail(const struct hog *h, int prot)
{
	size_t first = h->npages - h->protected_pages;

	if (h->protected_pages &&
	    mprotect(h->buf + first * PAGE_WORDS, h->protected_pages * PAGE_SIZE, prot) != 0) {
		perror("memhog: mprotect");
		exit(1);
	}
}

static void verify(struct hog *h)
{
	protect_tail(h, PROT_READ);
	h->checksum = checksum(h->buf, h->npages);
	protect_tail(h, PROT_NONE);
	h->verified_expected = h->expected;
	h->ok = h->checksum == h->expected;
	h->verified = 1;
	h->verifications++;
}

static int report(const struct hog *h, const char *path)
{
	char line[512];

	if (h->verified)
		snprintf(line, sizeof(line),
			 "verified mib=%lu seed=%llu checksum=%llu expected=%llu ok=%d "
			 "verifications=%llu dirtied=%llu counter=%llu\n",
			 h->mib, (unsigned long long)h->seed, (unsigned long long)h->checksum,
			 (unsigned long long)h->verified_expected, h->ok,
			 (unsigned long long)h->verifications, (unsigned long long)h->dirtied,
			 (unsigned long long)h->counter);
	else
		snprintf(line, sizeof(line),
			 "ready mib=%lu seed=%llu checksum=%llu expected=%llu dirtied=%llu "
			 "counter=%llu\n",
			 h->mib, (unsigned long long)h->seed, (unsigned long long)h->checksum,
			 (unsigned long long)h->expected, (unsigned long long)h->dirtied,
			 (unsigned long long)h->counter);
	return write_state(path, line);
}

static void install_handlers(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: nanosleep returns EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
}

int main(int argc, char **argv)
{
	struct hog h = { 0 };
	const struct timespec tick = { 0, TICK_NS };
	long pps = argc > 4 ? atol(argv[4]) : 10;
	long protected_mib = argc > 5 ? atol(argv[5]) : 0;
	long hole_mib = argc > 6 ? atol(argv[6]) : 0;
	uint64_t due;

	if (argc < 4 || atol(argv[1]) <= 0 || pps < 0 || protected_mib < 0 || hole_mib < 0 ||
	    protected_mib + hole_mib >= atol(argv[1])) {
		fprintf(stderr, "usage: memhog MIB SEED STATE [DIRTY_PAGES_PER_SEC [PROTECTED_MIB"
				" [HOLE_MIB]]] (PROTECTED_MIB + HOLE_MIB < MIB)\n");
		return 2;
	}
	h.mib = strtoul(argv[1], NULL, 10);
	h.seed = strtoull(argv[2], NULL, 10);
	h.rng = mix(h.seed ^ 0x6d656d686f67ULL);
	h.npages = (size_t)h.mib * (1024 * 1024 / PAGE_SIZE);
	h.buf = aligned_alloc(PAGE_SIZE, h.npages * PAGE_SIZE);
	if (!h.buf) {
		fprintf(stderr, "memhog: cannot allocate %lu MiB\n", h.mib);
		return 1;
	}
	for (size_t i = 0; i < h.npages; i++)
		fill_page(h.buf + i * PAGE_WORDS, h.seed, i, 0);
	if (hole_mib) {
		size_t hole_pages = (size_t)hole_mib * (1024 * 1024 / PAGE_SIZE);
		size_t first = (h.npages - hole_pages) / 2;

		if (madvise(h.buf + first * PAGE_WORDS, hole_pages * PAGE_SIZE, MADV_DONTNEED) != 0) {
			perror("memhog: madvise");
			return 1;
		}
	}
	h.checksum = h.expected = checksum(h.buf, h.npages);
	h.protected_pages = (size_t)protected_mib * (1024 * 1024 / PAGE_SIZE);
	protect_tail(&h, PROT_NONE);
	install_handlers();
	if (report(&h, argv[3]) != 0) {
		perror("memhog: write state");
		return 1;
	}
	while (!stop_requested) {
		if (nanosleep(&tick, NULL) != 0 && errno != EINTR)
			return 1;
		h.counter++;
		/* pps pages per second, spread evenly over the ticks */
		due = h.counter * pps / TICKS_PER_SEC - (h.counter - 1) * pps / TICKS_PER_SEC;
		while (due-- > 0)
			dirty_one(&h);
		if (verify_requested) {
			verify_requested = 0;
			verify(&h);
		}
		report(&h, argv[3]);
	}
	return 0;
}
