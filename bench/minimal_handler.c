/*
 * minimal_handler.c - the smallest useful userfaultfd post-copy handler.
 *
 * A baseline to compare the pagewire fault engine against: one handler thread,
 * one fault -> one pread of one page from the image -> one UFFDIO_COPY.
 * No prefetch, no background fill, no zero-page detection, no batching.
 *
 * Usage: minimal_handler IMAGE_PATH THREADS ORDER(random|sequential) SEED
 *
 * THREADS toucher threads each take a contiguous share of the touch order
 * (a seeded random permutation of all pages, or 0..N-1) and read one byte of
 * each page, timing every touch with CLOCK_MONOTONIC. total_s runs from the
 * start of touching until every toucher has finished. Afterwards the region
 * is compared to the image and one JSON line is printed on stdout.
 *
 * Build: gcc -O2 -pthread -o minimal_handler minimal_handler.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("minimal_handler: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* splitmix64: tiny, good-enough seeded RNG for the permutation. */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ---- shared state ---- */
static int g_uffd = -1;
static int g_img = -1;
static int g_stopfd = -1;
static char *g_region;
static size_t g_size;
static size_t g_page;
static atomic_uint_fast64_t g_faults;
static atomic_uint_fast64_t g_eexist;
static atomic_int g_handler_err; /* non-zero errno if the handler failed */

static int new_uffd(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    int err = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        die("userfaultfd syscall failed (%s) and /dev/userfaultfd unavailable (%s)",
            strerror(err), strerror(errno));
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    int err2 = errno;
    close(dev);
    if (fd < 0)
        die("USERFAULTFD_IOC_NEW: %s (syscall: %s)", strerror(err2), strerror(err));
    return fd;
}

static void *handler_main(void *arg)
{
    (void)arg;
    char *buf = aligned_alloc(g_page, g_page);
    if (!buf) {
        atomic_store(&g_handler_err, ENOMEM);
        return NULL;
    }
    struct pollfd pfd[2] = {
        {.fd = g_uffd, .events = POLLIN},
        {.fd = g_stopfd, .events = POLLIN},
    };
    for (;;) {
        int n = poll(pfd, 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            atomic_store(&g_handler_err, errno);
            break;
        }
        if (pfd[1].revents)
            break;
        if (pfd[0].revents & (POLLERR | POLLHUP)) {
            atomic_store(&g_handler_err, EPIPE);
            break;
        }
        if (!(pfd[0].revents & POLLIN))
            continue;

        struct uffd_msg msg;
        ssize_t r = read(g_uffd, &msg, sizeof msg);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            atomic_store(&g_handler_err, errno);
            break;
        }
        if (r != (ssize_t)sizeof msg) {
            atomic_store(&g_handler_err, EIO);
            break;
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT)
            continue;

        atomic_fetch_add(&g_faults, 1);
        uint64_t addr = msg.arg.pagefault.address & ~((uint64_t)g_page - 1);
        off_t off = (off_t)(addr - (uint64_t)(uintptr_t)g_region);
        size_t got = 0;
        while (got < g_page) {
            ssize_t k = pread(g_img, buf + got, g_page - got, off + (off_t)got);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                atomic_store(&g_handler_err, k < 0 ? errno : EIO);
                goto out;
            }
            got += (size_t)k;
        }
        struct uffdio_copy cp = {
            .dst = addr,
            .src = (uint64_t)(uintptr_t)buf,
            .len = g_page,
            .mode = 0,
        };
        for (;;) {
            if (ioctl(g_uffd, UFFDIO_COPY, &cp) == 0)
                break;
            if (errno == EEXIST) {
                atomic_fetch_add(&g_eexist, 1);
                break;
            }
            if (errno == EAGAIN) { /* mapping changing; retry the copy */
                cp.copy = 0;
                continue;
            }
            atomic_store(&g_handler_err, errno);
            goto out;
        }
    }
out:
    free(buf);
    return NULL;
}

struct toucher {
    pthread_t tid;
    const uint64_t *pages; /* page indices to touch, in order */
    size_t n;
    uint64_t *lat_ns; /* per-touch latency */
};

static void *toucher_main(void *arg)
{
    struct toucher *t = arg;
    volatile const char *base = g_region;
    for (size_t i = 0; i < t->n; i++) {
        size_t off = (size_t)t->pages[i] * g_page;
        uint64_t t0 = now_ns();
        (void)base[off];
        t->lat_ns[i] = now_ns() - t0;
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(const uint64_t *sorted, size_t n, double p)
{
    if (n == 0)
        return 0.0;
    size_t idx = (size_t)(p * (double)(n - 1) + 0.5);
    if (idx >= n)
        idx = n - 1;
    return (double)sorted[idx] / 1000.0;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s IMAGE_PATH THREADS random|sequential SEED\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    char *end;
    long threads = strtol(argv[2], &end, 10);
    if (*end || threads < 1 || threads > 1024)
        die("bad THREADS '%s' (1..1024)", argv[2]);
    int random_order;
    if (strcmp(argv[3], "random") == 0)
        random_order = 1;
    else if (strcmp(argv[3], "sequential") == 0)
        random_order = 0;
    else
        die("bad ORDER '%s' (random|sequential)", argv[3]);
    uint64_t seed = strtoull(argv[4], &end, 0);
    if (*end || !*argv[4])
        die("bad SEED '%s'", argv[4]);

    g_page = (size_t)sysconf(_SC_PAGESIZE);
    g_img = open(path, O_RDONLY | O_CLOEXEC);
    if (g_img < 0)
        die("open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(g_img, &st) < 0)
        die("fstat %s: %s", path, strerror(errno));
    g_size = (size_t)st.st_size;
    if (g_size == 0 || g_size % g_page)
        die("image size %zu is not a positive multiple of the page size %zu", g_size, g_page);
    size_t npages = g_size / g_page;

    g_region = mmap(NULL, g_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_region == MAP_FAILED)
        die("mmap %zu bytes: %s", g_size, strerror(errno));

    g_uffd = new_uffd();
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(g_uffd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API: %s", strerror(errno));
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)g_region, .len = g_size},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(g_uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER: %s", strerror(errno));
    if (!(reg.ioctls & ((uint64_t)1 << _UFFDIO_COPY)))
        die("UFFDIO_COPY not supported on this range");

    g_stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (g_stopfd < 0)
        die("eventfd: %s", strerror(errno));

    /* Touch order. */
    uint64_t *order = malloc(npages * sizeof *order);
    uint64_t *lat = malloc(npages * sizeof *lat);
    struct toucher *ts = calloc((size_t)threads, sizeof *ts);
    if (!order || !lat || !ts)
        die("out of memory");
    for (size_t i = 0; i < npages; i++)
        order[i] = i;
    if (random_order) { /* Fisher-Yates */
        uint64_t s = seed;
        for (size_t i = npages - 1; i > 0; i--) {
            size_t j = (size_t)(splitmix64(&s) % (uint64_t)(i + 1));
            uint64_t tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
    }

    pthread_t handler;
    int rc = pthread_create(&handler, NULL, handler_main, NULL);
    if (rc)
        die("pthread_create handler: %s", strerror(rc));

    /* Contiguous shares of the order list. */
    size_t base_n = npages / (size_t)threads, extra = npages % (size_t)threads, pos = 0;
    uint64_t t_start = now_ns();
    for (long t = 0; t < threads; t++) {
        size_t n = base_n + ((size_t)t < extra ? 1 : 0);
        ts[t].pages = order + pos;
        ts[t].lat_ns = lat + pos;
        ts[t].n = n;
        pos += n;
        rc = pthread_create(&ts[t].tid, NULL, toucher_main, &ts[t]);
        if (rc)
            die("pthread_create toucher: %s", strerror(rc));
    }
    for (long t = 0; t < threads; t++)
        pthread_join(ts[t].tid, NULL);
    uint64_t t_end = now_ns();

    uint64_t one = 1;
    if (write(g_stopfd, &one, sizeof one) != (ssize_t)sizeof one)
        die("eventfd write: %s", strerror(errno));
    pthread_join(handler, NULL);
    int herr = atomic_load(&g_handler_err);
    if (herr)
        die("handler failed: %s", strerror(herr));

    /* Verify region == image. */
    size_t chunk = (size_t)1 << 20;
    char *cbuf = malloc(chunk);
    if (!cbuf)
        die("out of memory");
    int verified = 1;
    for (size_t off = 0; off < g_size; off += chunk) {
        size_t len = g_size - off < chunk ? g_size - off : chunk;
        size_t got = 0;
        while (got < len) {
            ssize_t k = pread(g_img, cbuf + got, len - got, (off_t)(off + got));
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0)
                die("verify pread at %zu: %s", off + got, k < 0 ? strerror(errno) : "EOF");
            got += (size_t)k;
        }
        if (memcmp(cbuf, g_region + off, len) != 0) {
            verified = 0;
            fprintf(stderr, "minimal_handler: mismatch in chunk at offset %zu\n", off);
            break;
        }
    }
    free(cbuf);

    qsort(lat, npages, sizeof *lat, cmp_u64);
    printf("{\"handler\":\"minimal_c\",\"image_bytes\":%zu,\"pages\":%zu,\"threads\":%ld,"
           "\"order\":\"%s\",\"total_s\":%.6f,\"touch_p50_us\":%.3f,\"touch_p99_us\":%.3f,"
           "\"touch_max_us\":%.3f,\"faults\":%" PRIu64 ",\"eexist\":%" PRIu64
           ",\"verified\":%s}\n",
           g_size, npages, threads, random_order ? "random" : "sequential",
           (double)(t_end - t_start) / 1e9, pct_us(lat, npages, 0.50),
           pct_us(lat, npages, 0.99), (double)lat[npages - 1] / 1000.0,
           (uint64_t)atomic_load(&g_faults), (uint64_t)atomic_load(&g_eexist),
           verified ? "true" : "false");
    fflush(stdout);
    return verified ? 0 : 1;
}
