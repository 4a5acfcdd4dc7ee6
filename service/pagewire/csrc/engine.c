/*
 * pagewire._uffd: the native fault engine.
 *
 * One Engine per post-copy session. Each engine owns a copy of the workload's
 * userfaultfd and one native thread that reads fault and event messages,
 * resolves what it can alone (local image, known-zero pages, removed pages),
 * queues the rest for Python (signalled through an eventfd), and fills the
 * remaining pages in the background. That thread never takes the GIL. Python
 * installs fetched pages with Engine.install(), which releases the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Debian 12's headers predate these. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif

/* ---- page states ---------------------------------------------------- */

enum { ST_MISSING = 0, ST_REQUESTED = 1, ST_PRESENT = 2, ST_ZERO = 3, ST_REMOVED = 4 };
#define ST_MASK 0x07
#define SRC_ZERO 0x80

enum { KIND_FAULT = 0, KIND_PREFETCH = 1, KIND_BACKGROUND = 2 };
enum { RES_LOCAL = 0, RES_REMOTE = 1, RES_ZERO = 2, NRES = 3 };

/* log-scale histogram: bucket 0 is < 256 ns, then 4 buckets per power of two */
#define HIST_MIN_SHIFT 8
#define HIST_MAX_SHIFT 40
#define HIST_BUCKETS (1 + (HIST_MAX_SHIFT - HIST_MIN_SHIFT) * 4)

typedef struct {
    uint64_t counts[HIST_BUCKETS];
    uint64_t sum_ns, max_ns, n;
} hist_t;

static int hist_index(uint64_t ns)
{
    if (ns < (1ULL << HIST_MIN_SHIFT))
        return 0;
    int e = 63 - __builtin_clzll(ns);
    if (e >= HIST_MAX_SHIFT)
        return HIST_BUCKETS - 1;
    int sub = (int)((ns >> (e - 2)) & 3);
    return 1 + (e - HIST_MIN_SHIFT) * 4 + sub;
}

static uint64_t hist_upper(int i)
{
    if (i == 0)
        return 1ULL << HIST_MIN_SHIFT;
    int e = (i - 1) / 4 + HIST_MIN_SHIFT, sub = (i - 1) % 4;
    return (uint64_t)(4 + sub + 1) << (e - 2);
}

static void hist_add(hist_t *h, uint64_t ns)
{
    h->counts[hist_index(ns)]++;
    h->sum_ns += ns;
    h->n++;
    if (ns > h->max_ns)
        h->max_ns = ns;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- native data channel: digests and wire ---------------------------------
 *
 * Between agents on plain-text links (loopback, or --insecure-peers), page data may
 * flow over a native TCP channel negotiated and authorised over gRPC: a 16-byte token
 * per session. Under mTLS gRPC carries the data. Two connections per session (urgent,
 * bulk), so a demand fault never waits behind bulk data.
 *
 *   hello    client: "PWDATA01" token[16] u32 kind u32 0    server: "PWOK" u32 status
 *   request  u32 count (1..MAX_REQ) u32 0, count x u64 chunk index
 *   answer   per index: u64 index u32 data_len u32 status, then data_len bytes: the
 *            chunk's non-zero pages in order (zero pages never cross the network)
 */

#include <dlfcn.h>
#include <openssl/sha.h>
#include <sched.h>
/* XXH3 from libxxhash-dev, compiled in (the runtime image needs no extra library) */
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/sendfile.h>
#include <sys/socket.h>

#define CHAN_MAGIC "PWDATA01"
#define CHAN_MAX_REQ 4096
#define CHAN_OK 0
#define CHAN_STALE 1
#define CHAN_RANGE 2
#define CHAN_DENIED 3
#define CHAN_BUSY 4 /* hello refused: the source's connection limit (per peer or total) */
#define CHAN_ZSTD (1u << 16) /* answer flag: data is zstd; hello kind flag: please compress */

static void sha256(const uint8_t *data, size_t len, uint8_t out[32])
{
    SHA256(data, len, out);
}

/* The per-chunk check on the hot path: XXH3-128 (libxxhash) runs near memory speed.
 * SHA-256 stays the export's identity and the cache key; see README "Integrity". */
static void fast_digest(const uint8_t *data, size_t len, uint8_t out[16])
{
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, XXH3_128bits(data, len));
    memcpy(out, canon.digest, 16);
}

/* zstd, loaded at run time like libcrypto: wire compression is optional */
typedef size_t (*zstd_compress_t)(void *, size_t, const void *, size_t, int);
typedef size_t (*zstd_decompress_t)(void *, size_t, const void *, size_t);
typedef unsigned (*zstd_is_error_t)(size_t);
static zstd_compress_t zstd_compress_fn;
static zstd_decompress_t zstd_decompress_fn;
static zstd_is_error_t zstd_is_error_fn;

static void load_libzstd(void)
{
    void *h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return;
    zstd_compress_fn = (zstd_compress_t)dlsym(h, "ZSTD_compress");
    zstd_decompress_fn = (zstd_decompress_t)dlsym(h, "ZSTD_decompress");
    zstd_is_error_fn = (zstd_is_error_t)dlsym(h, "ZSTD_isError");
    if (!zstd_compress_fn || !zstd_decompress_fn || !zstd_is_error_fn)
        zstd_compress_fn = NULL;
}

static int64_t zstd_pack(uint8_t *dst, size_t cap, const uint8_t *src, size_t len)
{
    size_t n = zstd_compress_fn(dst, cap, src, len, 1);
    return zstd_is_error_fn(n) ? -1 : (int64_t)n;
}

static int64_t zstd_unpack(uint8_t *dst, size_t cap, const uint8_t *src, size_t len)
{
    size_t n = zstd_decompress_fn(dst, cap, src, len);
    return zstd_is_error_fn(n) ? -1 : (int64_t)n;
}

static int read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

typedef struct {
    uint64_t index;
    uint32_t data_len, status;
} chan_answer_t;

/* ---- per-host chunk cache ---------------------------------------------------
 *
 * Verified chunks keyed by their SHA-256 (content addressing: the same digest is the
 * same bytes, whichever export it came from), shared by every session on this host,
 * bounded in bytes with LRU eviction. An entry is PENDING while one session's bulk
 * fetches it, so concurrent sessions of one image fetch each chunk once. A chunk enters
 * only if its SHA-256 matches its key (sessions verify wire data with the fast digest of
 * their own export, which does not make a content address shared across peers); every hit
 * is checked against the fast digest taken at fill before it is installed.
 */

#define CACHE_BUCKETS 8192

typedef struct centry {
    uint8_t digest[32];
    uint8_t fast[16]; /* XXH3-128 of data, taken when it was filled (after SHA-256 passed) */
    uint8_t *data;
    uint32_t len;
    int pending;
    const void *owner;
    struct centry *next_in_bucket, *lru_prev, *lru_next;
} centry_t;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    centry_t *buckets[CACHE_BUCKETS];
    centry_t *lru_head, *lru_tail; /* head: most recent */
    uint64_t capacity, bytes, entries;
    uint64_t hits, misses, evictions, corrupt, fills;
} ChunkCache;

enum { CACHE_ABSENT = 0, CACHE_READY = 1, CACHE_PENDING = 2 };

static unsigned cache_bucket(const uint8_t d[32])
{
    uint32_t h;
    memcpy(&h, d, 4);
    return h % CACHE_BUCKETS;
}

static centry_t *cache_find(ChunkCache *c, const uint8_t d[32])
{
    for (centry_t *x = c->buckets[cache_bucket(d)]; x; x = x->next_in_bucket)
        if (memcmp(x->digest, d, 32) == 0)
            return x;
    return NULL;
}

static void lru_unlink(ChunkCache *c, centry_t *x)
{
    if (x->lru_prev)
        x->lru_prev->lru_next = x->lru_next;
    else if (c->lru_head == x)
        c->lru_head = x->lru_next;
    if (x->lru_next)
        x->lru_next->lru_prev = x->lru_prev;
    else if (c->lru_tail == x)
        c->lru_tail = x->lru_prev;
    x->lru_prev = x->lru_next = NULL;
}

static void lru_push(ChunkCache *c, centry_t *x)
{
    x->lru_prev = NULL;
    x->lru_next = c->lru_head;
    if (c->lru_head)
        c->lru_head->lru_prev = x;
    c->lru_head = x;
    if (!c->lru_tail)
        c->lru_tail = x;
}

static void cache_drop(ChunkCache *c, centry_t *x)
{
    centry_t **pp = &c->buckets[cache_bucket(x->digest)];
    while (*pp && *pp != x)
        pp = &(*pp)->next_in_bucket;
    if (*pp)
        *pp = x->next_in_bucket;
    lru_unlink(c, x);
    c->bytes -= x->len;
    c->entries--;
    free(x->data);
    free(x);
}

static void cache_evict(ChunkCache *c)
{
    centry_t *x = c->lru_tail;
    while (x && c->bytes > c->capacity) {
        centry_t *prev = x->lru_prev;
        if (!x->pending) {
            cache_drop(c, x);
            c->evictions++;
        }
        x = prev;
    }
}

/* A verified copy of the chunk into dst: CACHE_READY on a hit; a corrupt entry is
 * dropped and counts as a miss. Claims an absent entry for owner if claim is set. */
static int cache_take(ChunkCache *c, const uint8_t d[32], uint8_t *dst, uint32_t len,
                      const void *owner, int claim)
{
    if (!c)
        return CACHE_ABSENT;
    pthread_mutex_lock(&c->lock);
    centry_t *x = cache_find(c, d);
    int result = CACHE_ABSENT;
    uint8_t want[16];
    if (x && x->pending) {
        result = x->owner == owner ? CACHE_ABSENT : CACHE_PENDING;
    } else if (x && x->len == len) {
        memcpy(dst, x->data, len);
        memcpy(want, x->fast, 16);
        lru_unlink(c, x);
        lru_push(c, x);
        result = CACHE_READY;
    }
    pthread_mutex_unlock(&c->lock);
    if (result == CACHE_READY) {
        uint8_t check[16];
        fast_digest(dst, len, check);
        if (memcmp(check, want, 16) != 0) {
            pthread_mutex_lock(&c->lock);
            if ((x = cache_find(c, d)) && !x->pending)
                cache_drop(c, x);
            c->corrupt++;
            pthread_mutex_unlock(&c->lock);
            result = CACHE_ABSENT;
        }
    }
    pthread_mutex_lock(&c->lock);
    if (result == CACHE_READY)
        c->hits++;
    else if (result == CACHE_ABSENT) {
        c->misses++;
        if (claim && !cache_find(c, d) && c->capacity >= len) {
            centry_t *n = calloc(1, sizeof *n);
            if (n) {
                memcpy(n->digest, d, 32);
                n->pending = 1;
                n->owner = owner;
                n->next_in_bucket = c->buckets[cache_bucket(d)];
                c->buckets[cache_bucket(d)] = n;
                c->entries++;
            }
        }
    }
    pthread_mutex_unlock(&c->lock);
    return result;
}

/* A claim whose chunk will not come after all (its data did not match the key). */
static void cache_refuse(ChunkCache *c, const uint8_t d[32])
{
    pthread_mutex_lock(&c->lock);
    centry_t *x = cache_find(c, d);
    if (x && x->pending) {
        centry_t **pp = &c->buckets[cache_bucket(d)];
        while (*pp && *pp != x)
            pp = &(*pp)->next_in_bucket;
        if (*pp)
            *pp = x->next_in_bucket;
        c->entries--;
        free(x);
    }
    c->corrupt++;
    pthread_mutex_unlock(&c->lock);
}

/* Keep a chunk (fulfilling a claim, or adding it) if its SHA-256 is its key. */
static void cache_fill(ChunkCache *c, const uint8_t d[32], const uint8_t *data, uint32_t len)
{
    if (!c || c->capacity < len)
        return;
    uint8_t check[32];
    sha256(data, len, check);
    if (memcmp(check, d, 32) != 0) {
        cache_refuse(c, d);
        return;
    }
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return;
    memcpy(copy, data, len);
    uint8_t fast[16];
    fast_digest(copy, len, fast);
    pthread_mutex_lock(&c->lock);
    centry_t *x = cache_find(c, d);
    if (!x) {
        x = calloc(1, sizeof *x);
        if (!x) {
            pthread_mutex_unlock(&c->lock);
            free(copy);
            return;
        }
        memcpy(x->digest, d, 32);
        x->next_in_bucket = c->buckets[cache_bucket(d)];
        c->buckets[cache_bucket(d)] = x;
        c->entries++;
    } else if (!x->pending) {
        pthread_mutex_unlock(&c->lock);
        free(copy);
        return;
    } else {
        lru_unlink(c, x);
    }
    x->data = copy;
    memcpy(x->fast, fast, 16);
    x->len = len;
    x->pending = 0;
    x->owner = NULL;
    c->bytes += len;
    c->fills++;
    lru_push(c, x);
    cache_evict(c);
    pthread_mutex_unlock(&c->lock);
}

/* A failed fetcher gives its claims back, so others fetch those chunks themselves. */
static void cache_release(ChunkCache *c, const void *owner)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    for (int b = 0; b < CACHE_BUCKETS; b++) {
        centry_t **pp = &c->buckets[b];
        while (*pp) {
            centry_t *x = *pp;
            if (x->pending && x->owner == owner) {
                *pp = x->next_in_bucket;
                c->entries--;
                free(x);
            } else {
                pp = &x->next_in_bucket;
            }
        }
    }
    pthread_mutex_unlock(&c->lock);
}

static void cache_clear_locked(ChunkCache *c)
{
    for (int b = 0; b < CACHE_BUCKETS; b++) {
        centry_t **pp = &c->buckets[b];
        while (*pp) {
            centry_t *x = *pp;
            if (x->pending) {
                pp = &x->next_in_bucket;
                continue;
            }
            *pp = x->next_in_bucket;
            lru_unlink(c, x);
            c->bytes -= x->len;
            c->entries--;
            free(x->data);
            free(x);
        }
    }
}

static int ChunkCache_init(ChunkCache *c, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"capacity", NULL};
    unsigned long long cap;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K", kwlist, &cap))
        return -1;
    if (c->capacity == 0 && c->entries == 0)
        pthread_mutex_init(&c->lock, NULL);
    c->capacity = cap;
    return 0;
}

static void ChunkCache_dealloc(ChunkCache *c)
{
    cache_clear_locked(c);
    cache_release(c, NULL);
    for (int b = 0; b < CACHE_BUCKETS; b++) /* claims of engines long gone */
        while (c->buckets[b]) {
            centry_t *x = c->buckets[b];
            c->buckets[b] = x->next_in_bucket;
            free(x->data);
            free(x);
        }
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *ChunkCache_get(ChunkCache *c, PyObject *args)
{
    Py_buffer d;
    unsigned int len;
    if (!PyArg_ParseTuple(args, "y*I", &d, &len))
        return NULL;
    if (d.len != 32) {
        PyBuffer_Release(&d);
        return PyErr_Format(PyExc_ValueError, "digests are 32 bytes");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, len);
    int r = CACHE_ABSENT;
    if (out) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS r = cache_take(c, d.buf, dst, len, NULL, 0);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&d);
    if (out && r != CACHE_READY) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* claim(digest, length, owner) -> (state, data): READY with a verified copy, PENDING
 * (another owner fetches it), or ABSENT (now claimed by owner, a nonzero int). */
static PyObject *ChunkCache_claim(ChunkCache *c, PyObject *args)
{
    Py_buffer d;
    unsigned int len;
    unsigned long long owner;
    if (!PyArg_ParseTuple(args, "y*IK", &d, &len, &owner))
        return NULL;
    if (d.len != 32 || owner == 0) {
        PyBuffer_Release(&d);
        return PyErr_Format(PyExc_ValueError, "a 32-byte digest and a nonzero owner");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, len);
    int r = CACHE_ABSENT;
    if (out) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        const void *who = (const void *)(uintptr_t)owner;
        Py_BEGIN_ALLOW_THREADS r = cache_take(c, d.buf, dst, len, who, 1);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&d);
    if (!out)
        return NULL;
    if (r != CACHE_READY) {
        Py_DECREF(out);
        return Py_BuildValue("(iO)", r, Py_None);
    }
    return Py_BuildValue("(iN)", r, out);
}

static PyObject *ChunkCache_release(ChunkCache *c, PyObject *arg)
{
    unsigned long long owner = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    cache_release(c, (const void *)(uintptr_t)owner);
    Py_RETURN_NONE;
}

static PyObject *ChunkCache_put(ChunkCache *c, PyObject *args)
{
    Py_buffer d, data;
    if (!PyArg_ParseTuple(args, "y*y*", &d, &data))
        return NULL;
    if (d.len == 32) {
        Py_BEGIN_ALLOW_THREADS cache_fill(c, d.buf, data.buf, (uint32_t)data.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&d);
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

static PyObject *ChunkCache_clear(ChunkCache *c, PyObject *unused)
{
    pthread_mutex_lock(&c->lock);
    cache_clear_locked(c);
    pthread_mutex_unlock(&c->lock);
    Py_RETURN_NONE;
}

#ifdef PAGEWIRE_TEST_HOOKS
/* Test hook: flip one byte of a cached chunk, to prove hits are verified. */
static PyObject *ChunkCache_corrupt(ChunkCache *c, PyObject *arg)
{
    Py_buffer d;
    if (PyObject_GetBuffer(arg, &d, PyBUF_SIMPLE) < 0)
        return NULL;
    pthread_mutex_lock(&c->lock);
    centry_t *x = d.len == 32 ? cache_find(c, d.buf) : NULL;
    int done = x && !x->pending && x->len > 0;
    if (done)
        x->data[0] ^= 0xFF;
    pthread_mutex_unlock(&c->lock);
    PyBuffer_Release(&d);
    return PyBool_FromLong(done);
}
#endif

static PyObject *ChunkCache_stats(ChunkCache *c, PyObject *unused)
{
    pthread_mutex_lock(&c->lock);
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKsK}", "capacity", (unsigned long long)c->capacity, "bytes",
        (unsigned long long)c->bytes, "entries", (unsigned long long)c->entries, "hits",
        (unsigned long long)c->hits, "misses", (unsigned long long)c->misses, "evictions",
        (unsigned long long)c->evictions, "corrupt", (unsigned long long)c->corrupt, "fills",
        (unsigned long long)c->fills);
    pthread_mutex_unlock(&c->lock);
    return d;
}

static PyMethodDef ChunkCache_methods[] = {
    {"get", (PyCFunction)ChunkCache_get, METH_VARARGS, "get(digest, length) -> bytes or None"},
    {"put", (PyCFunction)ChunkCache_put, METH_VARARGS, "put(digest, verified chunk)"},
    {"claim", (PyCFunction)ChunkCache_claim, METH_VARARGS,
     "claim(digest, length, owner) -> (state, data or None)"},
    {"release", (PyCFunction)ChunkCache_release, METH_O, "Give back an owner's claims."},
    {"clear", (PyCFunction)ChunkCache_clear, METH_NOARGS, "Drop every ready entry."},
#ifdef PAGEWIRE_TEST_HOOKS
    {"corrupt", (PyCFunction)ChunkCache_corrupt, METH_O, "Test hook: damage one entry."},
#endif
    {"stats", (PyCFunction)ChunkCache_stats, METH_NOARGS, "Counters."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject ChunkCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pagewire._uffd.ChunkCache",
    .tp_basicsize = sizeof(ChunkCache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Verified chunks by digest, shared by the sessions of a host.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ChunkCache_init,
    .tp_dealloc = (destructor)ChunkCache_dealloc,
    .tp_methods = ChunkCache_methods,
};

/* ---- engine ---------------------------------------------------------- */

typedef struct {
    uint64_t base, size, offset, page_size, npages;
    uint8_t *state;
} region_t;

typedef struct {
    int region;
    uint64_t page;
    uint64_t t0;
} pending_t;

typedef struct {
    void *items;
    size_t len, cap, item_size;
} vec_t;

enum { E_CREATED, E_RUNNING, E_COMPLETED, E_FAILED };
static const char *state_names[] = {"created", "running", "completed", "failed"};

struct chan;

typedef struct {
    PyObject_HEAD
    int uffd, ctl_fd, notify_fd, source_fd, pidfd;
    uint64_t features, source_size, sys_page;
    int nregions;
    region_t *regions;
    int background, window_pages;
    uint64_t window, window_max; /* fault-around, adapted to the access pattern */
    int last_region;
    uint64_t last_page;
    uint64_t batch_bytes;
    uint8_t *buf, *zero_buf;
    size_t buf_size;

    pthread_t thread;
    int thread_started, thread_joined;
    pthread_mutex_t lock;
    int stop;
    int state;
    char error[64];

    vec_t pending;  /* pending_t: faults waiting for Python */
    vec_t requests; /* uint64_t image offsets for Python */
    int bg_region;
    uint64_t bg_page;
    int bg_done;

    uint64_t total, n_present, n_zero, n_removed;
    uint64_t faults[NRES];
    uint64_t pages_by_kind[3], bytes_installed;
    uint64_t ev_remove, ev_unmap, ev_remap, ev_fork, copy_eagain, faults_unknown, pages_eexist;
    hist_t hist[NRES];
    struct chan *chan; /* native data channel to the source, if negotiated */
    /* working-set record: image chunks (of ws_unit bytes) in first-touch order */
    uint64_t ws_unit, ws_chunks, ws_len;
    uint8_t *ws_seen;
    uint64_t *ws_order;
} Engine;

static PyObject *UffdError;

static int vec_push(vec_t *v, const void *item)
{
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        void *n = realloc(v->items, cap * v->item_size);
        if (!n)
            return -1;
        v->items = n;
        v->cap = cap;
    }
    memcpy((char *)v->items + v->len * v->item_size, item, v->item_size);
    v->len++;
    return 0;
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof one) < 0) {
        /* eventfd full cannot happen at these counts; nothing to do */
    }
}

static void set_state(Engine *e, region_t *r, uint64_t p, int st)
{
    int old = r->state[p] & ST_MASK;
    if (old == st)
        return;
    if (old == ST_PRESENT)
        e->n_present--;
    else if (old == ST_ZERO)
        e->n_zero--;
    else if (old == ST_REMOVED)
        e->n_removed--;
    if (st == ST_PRESENT)
        e->n_present++;
    else if (st == ST_ZERO)
        e->n_zero++;
    else if (st == ST_REMOVED)
        e->n_removed++;
    r->state[p] = (uint8_t)((r->state[p] & ~ST_MASK) | st);
}

static int page_done(uint8_t s)
{
    int st = s & ST_MASK;
    return st == ST_PRESENT || st == ST_ZERO || st == ST_REMOVED;
}

static int all_done(Engine *e) { return e->n_present + e->n_zero + e->n_removed >= e->total; }

static void engine_fail_locked(Engine *e, const char *code)
{
    if (e->state == E_RUNNING || e->state == E_CREATED) {
        e->state = E_FAILED;
        snprintf(e->error, sizeof e->error, "%s", code);
    }
    e->stop = 1;
}

static int find_region(Engine *e, uint64_t addr)
{
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        if (addr >= r->base && addr - r->base < r->size)
            return i;
    }
    return -1;
}

/* ---- installs --------------------------------------------------------- */

enum { INS_OK = 0, INS_AGAIN = 1, INS_GONE = 2, INS_ERR = 3 };

static int classify_errno(Engine *e, int err)
{
    if (err == EAGAIN) {
        e->copy_eagain++;
        return INS_AGAIN;
    }
    if (err == ESRCH) {
        engine_fail_locked(e, "workload_exited");
        return INS_GONE;
    }
    if (err == ENOENT || err == EFAULT)
        return INS_GONE; /* the range is no longer mapped */
    engine_fail_locked(e, "install_failed");
    return INS_ERR;
}

/* COPY (src != NULL) or ZEROPAGE (src == NULL) pages [p, p+n) of region r,
 * honouring partial progress: advance by what was done, skip a page that is
 * already present (-EEXIST), stop only on -EAGAIN (events pending).
 * *done receives the pages handled. */
static int install_run(Engine *e, region_t *r, uint64_t p, uint64_t n, const uint8_t *src,
                       int new_state, uint64_t *done)
{
    uint64_t ps = r->page_size, off = 0, len = n * ps;
    int use_zeropage = (src == NULL && ps == e->sys_page);
    *done = 0;
    while (off < len) {
        int64_t got;
        int rc;
        if (use_zeropage) {
            struct uffdio_zeropage z = {.range = {r->base + p * ps + off, len - off}, .mode = 0};
            rc = ioctl(e->uffd, UFFDIO_ZEROPAGE, &z);
            got = z.zeropage;
        } else {
            const uint8_t *from = src ? src + off : e->zero_buf;
            uint64_t chunk = src ? len - off : ps; /* huge zero pages one at a time */
            struct uffdio_copy c = {.dst = r->base + p * ps + off, .src = (uint64_t)(uintptr_t)from,
                                    .len = chunk, .mode = 0, .copy = 0};
            rc = ioctl(e->uffd, UFFDIO_COPY, &c);
            got = c.copy;
        }
        int err = rc < 0 ? errno : 0;
        if (got > 0) {
            uint64_t pages = (uint64_t)got / ps;
            for (uint64_t i = 0; i < pages; i++)
                set_state(e, r, p + off / ps + i, new_state);
            off += pages * ps;
            e->bytes_installed += src ? (uint64_t)got : 0;
            *done = off / ps;
            continue;
        }
        if (rc == 0)
            continue; /* a huge zero page copied */
        if (got < 0)
            err = (int)-got;
        if (err == EEXIST) {
            uint64_t q = p + off / ps;
            e->pages_eexist++;
            if ((r->state[q] & ST_MASK) != ST_REMOVED)
                set_state(e, r, q, new_state == ST_REMOVED ? ST_REMOVED : ST_PRESENT);
            off += ps;
            *done = off / ps;
            continue;
        }
        return classify_errno(e, err);
    }
    return INS_OK;
}

static int read_source(Engine *e, uint64_t img_off, uint8_t *dst, uint64_t len)
{
    uint64_t got = 0;
    while (got < len) {
        ssize_t n = pread(e->source_fd, dst + got, len - got, (off_t)(img_off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            engine_fail_locked(e, "source_read_failed");
            return -1;
        }
        got += (uint64_t)n;
    }
    return 0;
}

/* Install a run of pages of one kind (all data or all zero) from the local
 * source or as zero pages. */
static int install_local_run(Engine *e, region_t *r, uint64_t p, uint64_t n, int zero,
                             uint64_t *done)
{
    if (zero)
        return install_run(e, r, p, n, NULL, ST_ZERO, done);
    uint64_t len = n * r->page_size;
    if (read_source(e, r->offset + p * r->page_size, e->buf, len) < 0)
        return INS_ERR;
    return install_run(e, r, p, n, e->buf, ST_PRESENT, done);
}

/* ---- fault handling --------------------------------------------------- */

static int page_is_zero_src(region_t *r, uint64_t p) { return (r->state[p] & SRC_ZERO) != 0; }

static void record_fault(Engine *e, int res, uint64_t t0)
{
    e->faults[res]++;
    hist_add(&e->hist[res], now_ns() - t0);
}

static void wake_page(Engine *e, region_t *r, uint64_t p)
{
    struct uffdio_range w = {r->base + p * r->page_size, r->page_size};
    ioctl(e->uffd, UFFDIO_WAKE, &w);
}

/* Fault-around: install the missing pages of the aligned window holding p,
 * the faulting page's own run first. Returns an INS_* code for page p. */
/* Fault-around window: doubles while faults run forward (each lands in or just past the
 * previous window), halves back to the configured size when they jump around. */
static void adapt_window(Engine *e, int ri, uint64_t p)
{
    uint64_t min = (uint64_t)e->window_pages;
    if (min <= 1)
        return; /* prefetch "none" */
    int forward = ri == e->last_region && p >= e->last_page && p - e->last_page <= 2 * e->window;
    if (forward)
        e->window = e->window * 2 > e->window_max ? e->window_max : e->window * 2;
    else
        e->window = e->window / 2 < min ? min : e->window / 2;
    e->last_region = ri;
    e->last_page = p;
}

static int resolve_local(Engine *e, region_t *r, uint64_t p)
{
    uint64_t w = e->window;
    uint64_t max_pages = e->buf_size / r->page_size;
    if (w > max_pages)
        w = max_pages;
    if (w < 1)
        w = 1;
    uint64_t align = (uint64_t)e->window_pages;
    uint64_t lo = p - p % align, hi = lo + w; /* forward from the fault's aligned block */
    if (hi > r->npages)
        hi = r->npages;
    /* the faulting page's run, extended forward over pages of the same kind */
    int zero = page_is_zero_src(r, p);
    uint64_t end = p + 1;
    while (end < hi && (r->state[end] & ST_MASK) == ST_MISSING && page_is_zero_src(r, end) == zero)
        end++;
    uint64_t done;
    int rc = install_local_run(e, r, p, end - p, zero, &done);
    if (rc != INS_OK) {
        if (done > 0)
            rc = INS_OK; /* the faulting page itself went in */
        else
            return rc;
    }
    e->pages_by_kind[KIND_FAULT]++;
    e->pages_by_kind[KIND_PREFETCH] += done > 0 ? done - 1 : 0;
    /* then the rest of the window, best effort */
    uint64_t q = lo;
    while (q < hi && e->state == E_RUNNING) {
        if ((r->state[q] & ST_MASK) != ST_MISSING) {
            q++;
            continue;
        }
        int z = page_is_zero_src(r, q);
        uint64_t s = q;
        while (q < hi && (r->state[q] & ST_MASK) == ST_MISSING && page_is_zero_src(r, q) == z)
            q++;
        if (install_local_run(e, r, s, q - s, z, &done) != INS_OK) {
            e->pages_by_kind[KIND_PREFETCH] += done;
            break;
        }
        e->pages_by_kind[KIND_PREFETCH] += done;
    }
    return rc;
}

static void queue_request(Engine *e, region_t *r, uint64_t p)
{
    uint64_t off = r->offset + p * r->page_size;
    vec_push(&e->requests, &off);
}

static int chan_request_locked(Engine *e, region_t *r, uint64_t p);
static void chan_flush_urgent(Engine *e);
static void chan_stop(Engine *e);
static void chan_free(Engine *e);
static void chan_start_threads(Engine *e);

/* Decide one fault from current state. Returns 1 if resolved, 0 if it must
 * be retried after events are drained, -1 if it now waits for Python. */
/* Remember the chunk holding image offset off, once, in first-touch order. */
static void record_offset(Engine *e, uint64_t off)
{
    if (!e->ws_seen)
        return;
    uint64_t k = off / e->ws_unit;
    if (k < e->ws_chunks && !e->ws_seen[k]) {
        e->ws_seen[k] = 1;
        e->ws_order[e->ws_len++] = k;
    }
}

static void record_touch(Engine *e, region_t *r, uint64_t p)
{
    record_offset(e, r->offset + p * r->page_size);
}

static int decide_fault(Engine *e, int ri, uint64_t p, uint64_t t0)
{
    region_t *r = &e->regions[ri];
    int st = r->state[p] & ST_MASK;
    record_touch(e, r, p);
    uint64_t done;
    int rc;
    switch (st) {
    case ST_PRESENT:
    case ST_ZERO:
        wake_page(e, r, p);
        record_fault(e, st == ST_ZERO ? RES_ZERO : RES_LOCAL, t0);
        return 1;
    case ST_REMOVED:
        rc = install_run(e, r, p, 1, NULL, ST_REMOVED, &done);
        if (rc == INS_AGAIN)
            return 0;
        record_fault(e, RES_ZERO, t0);
        return 1;
    case ST_REQUESTED: {
        pending_t pe = {ri, p, t0};
        vec_push(&e->pending, &pe);
        return -1;
    }
    default:
        break;
    }
    if (page_is_zero_src(r, p)) {
        uint64_t end = p + 1;
        while (end < r->npages && end - p < 512 && (r->state[end] & ST_MASK) == ST_MISSING &&
               page_is_zero_src(r, end))
            end++;
        rc = install_run(e, r, p, end - p, NULL, ST_ZERO, &done);
        if (rc == INS_AGAIN && done == 0)
            return 0;
        e->pages_by_kind[KIND_FAULT]++;
        e->pages_by_kind[KIND_PREFETCH] += done > 0 ? done - 1 : 0;
        record_fault(e, RES_ZERO, t0);
        return 1;
    }
    adapt_window(e, ri, p);
    if (e->source_fd >= 0) {
        rc = resolve_local(e, r, p);
        if (rc == INS_AGAIN)
            return 0;
        record_fault(e, RES_LOCAL, t0);
        return 1;
    }
    set_state(e, r, p, ST_REQUESTED);
    if (!chan_request_locked(e, r, p))
        queue_request(e, r, p);
    pending_t pe = {ri, p, t0};
    vec_push(&e->pending, &pe);
    return -1;
}

/* Pending (remote) faults whose page has since been installed or removed. */
static void settle_pending(Engine *e)
{
    pending_t *items = e->pending.items;
    size_t keep = 0;
    for (size_t i = 0; i < e->pending.len; i++) {
        pending_t pe = items[i];
        region_t *r = &e->regions[pe.region];
        int st = r->state[pe.page] & ST_MASK;
        if (st == ST_PRESENT) {
            record_fault(e, RES_REMOTE, pe.t0);
            continue;
        }
        if (st == ST_ZERO) {
            record_fault(e, RES_ZERO, pe.t0);
            continue;
        }
        if (st == ST_REMOVED) {
            uint64_t done;
            if (install_run(e, r, pe.page, 1, NULL, ST_REMOVED, &done) != INS_AGAIN) {
                record_fault(e, RES_ZERO, pe.t0);
                continue;
            }
        }
        items[keep++] = pe;
    }
    e->pending.len = keep;
}

static void mark_range(Engine *e, uint64_t start, uint64_t end, int st)
{
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        uint64_t lo = start > r->base ? start : r->base;
        uint64_t hi = end < r->base + r->size ? end : r->base + r->size;
        if (lo >= hi)
            continue;
        uint64_t p0 = (lo - r->base) / r->page_size;
        uint64_t p1 = (hi - r->base + r->page_size - 1) / r->page_size;
        for (uint64_t p = p0; p < p1; p++)
            set_state(e, r, p, st);
    }
}

static void handle_remap(Engine *e, struct uffd_msg *m)
{
    uint64_t from = m->arg.remap.from, to = m->arg.remap.to, len = m->arg.remap.len;
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        if (r->base == from && r->size == len) {
            r->base = to;
            return;
        }
    }
    /* a partial move: the old range is gone; faults at the new addresses are unknown */
    mark_range(e, from, from + len, ST_REMOVED);
}

static void handle_event(Engine *e, struct uffd_msg *m)
{
    switch (m->event) {
    case UFFD_EVENT_REMOVE:
        e->ev_remove++;
        mark_range(e, m->arg.remove.start, m->arg.remove.end, ST_REMOVED);
        break;
    case UFFD_EVENT_UNMAP:
        e->ev_unmap++;
        mark_range(e, m->arg.remove.start, m->arg.remove.end, ST_REMOVED);
        break;
    case UFFD_EVENT_REMAP:
        e->ev_remap++;
        handle_remap(e, m);
        break;
    case UFFD_EVENT_FORK:
        /* children are not served (the client maps with MADV_DONTFORK) */
        e->ev_fork++;
        close((int)m->arg.fork.ufd);
        break;
    default:
        break;
    }
}

#define UFFD_MSG_BATCH 64

typedef struct {
    uint64_t addr, t0;
} fault_t;

/* POISON is probed, not read from the feature bits: from 6.6 the kernel offers it on
 * every uffd (Firecracker negotiates only EVENT_REMOVE). */
static void poison_page_or_fail(Engine *e, uint64_t addr)
{
    e->faults_unknown++;
    struct uffdio_poison po = {.range = {addr & ~(e->sys_page - 1), e->sys_page}, .mode = 0};
    if (ioctl(e->uffd, UFFDIO_POISON, &po) < 0 && (errno == ENOTTY || errno == EINVAL))
        engine_fail_locked(e, "fault_outside_regions");
}

/* Read every queued message; apply events; decide faults, deferring any that
 * hit -EAGAIN until the events behind them have been drained. */
static void handle_messages(Engine *e)
{
    fault_t *deferred = NULL;
    size_t ndef = 0, capdef = 0;
    for (int rounds = 0; rounds < 1000 && e->state == E_RUNNING; rounds++) {
        struct uffd_msg msgs[UFFD_MSG_BATCH];
        ssize_t n = read(e->uffd, msgs, sizeof msgs);
        uint64_t t0 = now_ns();
        int nmsg = n > 0 ? (int)(n / (ssize_t)sizeof(struct uffd_msg)) : 0;
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            engine_fail_locked(e, errno == ESRCH ? "workload_exited" : "uffd_read_failed");
            break;
        }
        for (int i = 0; i < nmsg; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
                handle_event(e, &msgs[i]);
                continue;
            }
            if (ndef == capdef) {
                capdef = capdef ? capdef * 2 : 64;
                void *grown = realloc(deferred, capdef * sizeof *deferred);
                if (!grown) {  /* fail closed: the session's policy poisons what is missing */
                    engine_fail_locked(e, "out_of_memory");
                    break;
                }
                deferred = grown;
            }
            deferred[ndef].addr = msgs[i].arg.pagefault.address;
            deferred[ndef].t0 = t0;
            ndef++;
        }
        size_t keep = 0;
        for (size_t i = 0; i < ndef && e->state == E_RUNNING; i++) {
            int ri = find_region(e, deferred[i].addr);
            if (ri < 0) {
                poison_page_or_fail(e, deferred[i].addr);
                continue;
            }
            region_t *r = &e->regions[ri];
            uint64_t p = (deferred[i].addr - r->base) / r->page_size;
            if (decide_fault(e, ri, p, deferred[i].t0) == 0)
                deferred[keep++] = deferred[i];
        }
        ndef = keep;
        settle_pending(e);
        if (nmsg < UFFD_MSG_BATCH && ndef == 0)
            break;
    }
    free(deferred);
}

/* ---- background fill ---------------------------------------------------- */

/* Install one contiguous batch of missing pages. Remote sessions fill only
 * the pages the source declared zero; Python brings the data. Returns 1 if
 * there may be more to do. */
static int background_step(Engine *e)
{
    while (e->bg_region < e->nregions) {
        region_t *r = &e->regions[e->bg_region];
        uint64_t max = e->batch_bytes / r->page_size;
        if (max < 1)
            max = 1;
        if (max * r->page_size > e->buf_size)
            max = e->buf_size / r->page_size;
        uint64_t p = e->bg_page;
        while (p < r->npages && !((r->state[p] & ST_MASK) == ST_MISSING &&
                                  (e->source_fd >= 0 || page_is_zero_src(r, p))))
            p++;
        if (p >= r->npages) {
            e->bg_region++;
            e->bg_page = 0;
            continue;
        }
        int zero = page_is_zero_src(r, p);
        uint64_t end = p + 1;
        while (end < r->npages && end - p < max && (r->state[end] & ST_MASK) == ST_MISSING &&
               page_is_zero_src(r, end) == zero)
            end++;
        uint64_t done;
        int rc = install_local_run(e, r, p, end - p, zero, &done);
        e->pages_by_kind[KIND_BACKGROUND] += done;
        e->bg_page = rc == INS_GONE ? end : p + done;
        return 1;
    }
    /* a full pass is over; go round again only if pages were deferred */
    if (!all_done(e) && e->source_fd >= 0) {
        e->bg_region = 0;
        e->bg_page = 0;
        e->bg_done++;
        return e->bg_done < 4;
    }
    return 0;
}

/* ---- completion and teardown -------------------------------------------- */

static void unregister_all(Engine *e)
{
    for (int i = 0; i < e->nregions; i++) {
        struct uffdio_range rg = {e->regions[i].base, e->regions[i].size};
        ioctl(e->uffd, UFFDIO_UNREGISTER, &rg);
    }
}

/* Read (and drop) any events still queued, so no madvise stays blocked. */
static void drain_events(Engine *e)
{
    struct uffd_msg msgs[UFFD_MSG_BATCH];
    for (int i = 0; i < 1000; i++) {
        ssize_t n = read(e->uffd, msgs, sizeof msgs);
        if (n <= 0)
            break;
        for (int k = 0; k < (int)(n / (ssize_t)sizeof(struct uffd_msg)); k++)
            if (msgs[k].event == UFFD_EVENT_FORK)
                close((int)msgs[k].arg.fork.ufd);
    }
}

static void close_uffd(Engine *e)
{
    if (e->uffd >= 0) {
        unregister_all(e);
        drain_events(e);
        close(e->uffd);
        e->uffd = -1;
    }
}

/* Read and drop the events queued on a uffd (closing forked uffds), so an
 * install or poison that met -EAGAIN can go on. */
static void discard_events(int uffd)
{
    struct uffd_msg msgs[UFFD_MSG_BATCH];
    for (int i = 0; i < 1000; i++) {
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n <= 0)
            break;
        for (int k = 0; k < (int)(n / (ssize_t)sizeof(struct uffd_msg)); k++)
            if (msgs[k].event == UFFD_EVENT_FORK)
                close((int)msgs[k].arg.fork.ufd);
    }
}

/* Poison [addr, addr+len) in steps of page: skip pages already present (-EEXIST),
 * drain events on -EAGAIN. Returns pages poisoned, or -1 with errno ENOTTY/EINVAL when
 * the kernel has no UFFDIO_POISON (before 6.6) and -2 for other errors (range not
 * registered with this uffd, process gone). */
static int64_t poison_range(int uffd, uint64_t addr, uint64_t len, uint64_t page)
{
    int64_t poisoned = 0;
    uint64_t pos = addr, end = addr + len;
    for (int again = 0; pos < end && again < 1000;) {
        struct uffdio_poison po = {.range = {pos, end - pos}, .mode = 0};
        if (ioctl(uffd, UFFDIO_POISON, &po) == 0) {
            poisoned += (int64_t)((end - pos) / page);
            return poisoned;
        }
        int err = errno;
        uint64_t done = po.updated > 0 ? (uint64_t)po.updated : 0;
        poisoned += (int64_t)(done / page);
        pos += done;
        if (err == EEXIST)
            pos += page; /* that page is present: the workload has its data */
        else if (err == EAGAIN) {
            discard_events(uffd);
            again++;
        } else if (err == ENOTTY || (err == EINVAL && poisoned == 0 && done == 0 && pos == addr)) {
            errno = err;
            return -1;
        } else {
            errno = err;
            return -2;
        }
    }
    return poisoned;
}

/* Poison every page still missing. Returns -1 only when the kernel lacks the ioctl. */
static int poison_missing(Engine *e)
{
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        for (uint64_t p = 0; p < r->npages;) {
            if (page_done(r->state[p])) {
                p++;
                continue;
            }
            uint64_t s = p;
            while (p < r->npages && !page_done(r->state[p]))
                p++;
            if (poison_range(e->uffd, r->base + s * r->page_size, (p - s) * r->page_size,
                             r->page_size) == -1)
                return -1;
        }
    }
    return 0;
}

/* ---- the fault thread ---------------------------------------------------- */

static void *fault_thread(void *arg)
{
    Engine *e = arg;
    struct pollfd fds[3] = {{e->uffd, POLLIN, 0}, {e->ctl_fd, POLLIN, 0}, {e->pidfd, POLLIN, 0}};
    int nfds = e->pidfd >= 0 ? 3 : 2;
    int more_bg = e->background;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        int stop = e->stop || e->state != E_RUNNING;
        pthread_mutex_unlock(&e->lock);
        if (stop)
            break;
        int rc = poll(fds, nfds, more_bg ? 0 : 1000);
        if (rc < 0 && errno != EINTR)
            break;
        pthread_mutex_lock(&e->lock);
        if (fds[1].revents & POLLIN) {
            uint64_t v;
            if (read(e->ctl_fd, &v, sizeof v) < 0) { /* spurious */
            }
        }
        /* a workload that exits right after its last page arrived restored fine: the
         * channel receiver's last install may land between poll and here */
        if (nfds == 3 && (fds[2].revents & (POLLIN | POLLHUP)) && !all_done(e)) {
            engine_fail_locked(e, "workload_exited");
        }
        size_t nreq_before = e->requests.len;
        if (e->state == E_RUNNING && (fds[0].revents & (POLLIN | POLLERR | POLLHUP)))
            handle_messages(e);
        if (e->state == E_RUNNING && more_bg && !e->stop)
            more_bg = background_step(e);
        int notify = e->requests.len > nreq_before;
        if (e->state == E_RUNNING && all_done(e)) {
            settle_pending(e);
            close_uffd(e);
            e->state = E_COMPLETED;
            notify = 1;
        }
        if (e->state == E_FAILED)
            notify = 1;
        pthread_mutex_unlock(&e->lock);
        chan_flush_urgent(e);
        if (notify)
            signal_fd(e->notify_fd);
    }
    pthread_mutex_lock(&e->lock);
    if (e->state == E_FAILED && strcmp(e->error, "workload_exited") == 0 && e->uffd >= 0) {
        close(e->uffd);
        e->uffd = -1;
    }
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->notify_fd);
    return NULL;
}

/* ---- Python type ---------------------------------------------------------- */

static uint64_t read_fdinfo_features(int fd)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    unsigned long long api = 0, feat = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "API:\t%llx:%llx", &api, &feat) == 2)
            break;
    fclose(f);
    return feat;
}

static int parse_regions(Engine *e, PyObject *seq)
{
    PyObject *fast = PySequence_Fast(seq, "regions must be a sequence");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > 4096) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "between 1 and 4096 regions");
        return -1;
    }
    e->regions = calloc((size_t)n, sizeof(region_t));
    e->nregions = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        region_t *r = &e->regions[i];
        unsigned long long b, s, o, ps;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KKKK", &b, &s, &o, &ps)) {
            Py_DECREF(fast);
            return -1;
        }
        if (ps == 0 || (ps & (ps - 1)) || b % ps || s % ps || o % ps || s == 0) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "region %zd is not page aligned", i);
            return -1;
        }
        r->base = b, r->size = s, r->offset = o, r->page_size = ps, r->npages = s / ps;
        r->state = calloc(r->npages, 1);
        if (!r->state) {
            Py_DECREF(fast);
            PyErr_NoMemory();
            return -1;
        }
        e->total += r->npages;
        if (ps > e->buf_size)
            e->buf_size = ps;
    }
    Py_DECREF(fast);
    return 0;
}

/* zero_map: one byte per page of zmap_ps bytes; a region page is zero when
 * every source page it covers is zero. */
static int apply_zero_map(Engine *e, Py_buffer *zm, uint64_t zmap_ps)
{
    const uint8_t *z = zm->buf;
    uint64_t zn = (uint64_t)zm->len;
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        if (r->page_size % zmap_ps)
            continue;
        uint64_t per = r->page_size / zmap_ps;
        for (uint64_t p = 0; p < r->npages; p++) {
            uint64_t first = (r->offset + p * r->page_size) / zmap_ps;
            int zero = first + per <= zn;
            for (uint64_t k = 0; zero && k < per; k++)
                zero = z[first + k] != 0;
            if (zero)
                r->state[p] |= SRC_ZERO;
        }
    }
    return 0;
}

static int dup_fd(int fd)
{
    if (fd < 0)
        return -1;
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (d < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    return d;
}

static void Engine_release(Engine *e)
{
    for (int i = 0; i < e->nregions; i++)
        free(e->regions[i].state);
    free(e->regions);
    e->regions = NULL;
    e->nregions = 0;
    free(e->pending.items);
    free(e->requests.items);
    e->pending.items = e->requests.items = NULL;
    if (e->buf)
        munmap(e->buf, e->buf_size);
    if (e->zero_buf)
        munmap(e->zero_buf, e->buf_size);
    e->buf = e->zero_buf = NULL;
    int *fds[] = {&e->uffd, &e->ctl_fd, &e->source_fd, &e->pidfd};
    for (int i = 0; i < 4; i++)
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
}

static void join_thread(Engine *e)
{
    if (e->thread_started && !e->thread_joined) {
        pthread_mutex_lock(&e->lock);
        e->stop = 1;
        pthread_mutex_unlock(&e->lock);
        signal_fd(e->ctl_fd);
        Py_BEGIN_ALLOW_THREADS pthread_join(e->thread, NULL);
        Py_END_ALLOW_THREADS e->thread_joined = 1;
    }
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"uffd", "regions", "notify_fd", "source_fd", "source_size",
                             "zero_map", "zero_map_page_size", "pidfd", "background",
                             "window_pages", "batch_bytes", NULL};
    int uffd, notify_fd, source_fd = -1, pidfd = -1, background = 1, window = 16;
    unsigned long long source_size = 0, zmap_ps = 0, batch = 1 << 20;
    PyObject *regions, *zmap_obj = Py_None;
    if (e->regions) {
        PyErr_SetString(PyExc_RuntimeError, "Engine already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOi|$iKOKipiK", kwlist, &uffd, &regions,
                                     &notify_fd, &source_fd, &source_size, &zmap_obj, &zmap_ps,
                                     &pidfd, &background, &window, &batch))
        return -1;
    e->uffd = e->ctl_fd = e->source_fd = e->pidfd = -1;
    e->notify_fd = notify_fd;
    e->sys_page = (uint64_t)sysconf(_SC_PAGESIZE);
    e->background = background;
    e->window_pages = window < 1 ? 1 : (window > 4096 ? 4096 : window);
    e->window = (uint64_t)e->window_pages;
    e->last_region = -1;
    e->batch_bytes = batch < e->sys_page ? e->sys_page : batch;
    e->pending.item_size = sizeof(pending_t);
    e->requests.item_size = sizeof(uint64_t);
    pthread_mutex_init(&e->lock, NULL);
    if (parse_regions(e, regions) < 0)
        return -1;
    for (int i = 0; i < e->nregions; i++)
        if (source_fd >= 0 && e->regions[i].offset + e->regions[i].size > source_size) {
            PyErr_Format(PyExc_ValueError, "region %d extends beyond the source image", i);
            return -1;
        }
    uint64_t want = e->batch_bytes > (uint64_t)e->window_pages * e->sys_page
                        ? e->batch_bytes
                        : (uint64_t)e->window_pages * e->sys_page;
    if (want > e->buf_size)
        e->buf_size = want;
    e->window_max = e->buf_size / e->sys_page > 256 ? 256 : e->buf_size / e->sys_page;
    if (e->window_max < e->window)
        e->window_max = e->window;
    e->buf = mmap(NULL, e->buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    e->zero_buf =
        mmap(NULL, e->buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (e->buf == MAP_FAILED || e->zero_buf == MAP_FAILED) {
        e->buf = e->zero_buf = NULL;
        PyErr_NoMemory();
        return -1;
    }
    if (zmap_obj != Py_None) {
        Py_buffer zm;
        if (PyObject_GetBuffer(zmap_obj, &zm, PyBUF_SIMPLE) < 0)
            return -1;
        if (zmap_ps == 0 || (zmap_ps & (zmap_ps - 1))) {
            PyBuffer_Release(&zm);
            PyErr_SetString(PyExc_ValueError, "zero_map_page_size must be a power of two");
            return -1;
        }
        apply_zero_map(e, &zm, zmap_ps);
        PyBuffer_Release(&zm);
    }
    e->features = read_fdinfo_features(uffd);
    e->source_size = source_size;
    if ((e->uffd = dup_fd(uffd)) < 0)
        return -1;
    if (source_fd >= 0 && (e->source_fd = dup_fd(source_fd)) < 0)
        return -1;
    if (pidfd >= 0 && (e->pidfd = dup_fd(pidfd)) < 0)
        return -1;
    int fl = fcntl(e->uffd, F_GETFL);
    fcntl(e->uffd, F_SETFL, fl | O_NONBLOCK);
    e->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->ctl_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->state = E_CREATED;
    return 0;
}

static void Engine_dealloc(Engine *e)
{
    chan_stop(e);
    join_thread(e);
    chan_free(e);
    free(e->ws_seen);
    free(e->ws_order);
    if (e->regions || e->uffd >= 0)
        pthread_mutex_destroy(&e->lock);
    Engine_release(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_start(Engine *e, PyObject *unused)
{
    if (e->state != E_CREATED || !e->regions) {
        PyErr_SetString(PyExc_RuntimeError, "engine not in the created state");
        return NULL;
    }
    e->state = E_RUNNING;
    if (pthread_create(&e->thread, NULL, fault_thread, e) != 0) {
        e->state = E_FAILED;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->thread_started = 1;
    chan_start_threads(e);
    Py_RETURN_NONE;
}

/* Copy the data at image offset [off, off+len) into every region page that
 * still needs it (missing or requested), retrying while events are pending. */
static uint64_t install_image_range(Engine *e, uint64_t off, const uint8_t *data, uint64_t len,
                                    int kind, int wait)
{
    uint64_t installed = 0;
    for (int i = 0; i < e->nregions && e->state <= E_RUNNING; i++) {
        region_t *r = &e->regions[i];
        uint64_t lo = off > r->offset ? off : r->offset;
        uint64_t hi = off + len < r->offset + r->size ? off + len : r->offset + r->size;
        if (lo >= hi)
            continue;
        uint64_t p = (lo - r->offset + r->page_size - 1) / r->page_size;
        uint64_t pend = (hi - r->offset) / r->page_size;
        int tries = 0;
        while (p < pend && e->state <= E_RUNNING) {
            int st = r->state[p] & ST_MASK;
            if (st != ST_MISSING && st != ST_REQUESTED) {
                p++;
                continue;
            }
            uint64_t s = p, nreq = 0;
            while (p < pend && ((r->state[p] & ST_MASK) == ST_MISSING ||
                                (r->state[p] & ST_MASK) == ST_REQUESTED)) {
                nreq += (r->state[p] & ST_MASK) == ST_REQUESTED;
                p++;
            }
            const uint8_t *src = data + (r->offset + s * r->page_size - off);
            uint64_t done;
            int rc = install_run(e, r, s, p - s, src, ST_PRESENT, &done);
            installed += done;
            e->pages_by_kind[kind] += done > nreq ? done - nreq : 0;
            e->pages_by_kind[KIND_FAULT] += done > nreq ? nreq : done;
            if (rc == INS_AGAIN && !wait)
                return installed; /* the fault thread itself must drain the events */
            if (rc == INS_AGAIN && tries++ < 20000) {
                /* events pending: let the fault thread drain them, then look again */
                p = s + done;
                pthread_mutex_unlock(&e->lock);
                signal_fd(e->ctl_fd);
                struct timespec ts = {0, 20000};
                nanosleep(&ts, NULL);
                pthread_mutex_lock(&e->lock);
            } else if (rc != INS_OK && rc != INS_GONE) {
                break;
            }
        }
    }
    return installed;
}

/* ---- native data channel: the destination's side, inside the engine -------- */

struct chan {
    int urgent_fd, bulk_fd, up, background, compress;
    uint64_t chunk_size, export_size, export_ps, nchunks;
    uint8_t *zmap, *digests, *asked;
    uint8_t *fast; /* XXH3-128 per chunk from Describe, or NULL: verify with SHA-256 */
    uint32_t outstanding;
    uint64_t last_answer_ns;
    pthread_t urx, bulk;
    int urx_started, bulk_started;
    uint64_t bytes_received, digest_failures, chunks_urgent, chunks_bulk, bytes_raw;
    uint64_t chunks_cached;
    ChunkCache *cache; /* shared by the host's sessions, or NULL */
    uint8_t *hitbuf;   /* the fault thread's copy of a cached chunk */
    char down_reason[96];
    /* urgent requests decided under the engine lock, sent (or served from the cache) by
     * the fault thread once it has let go of the lock */
    uint64_t *outbox, *sendbuf;
    uint32_t nout;
    uint64_t bulk_cursor; /* next chunk the bulk pass looks at: one linear pass */
    uint64_t *ws;          /* a recorded working set, asked for first in one burst */
    uint64_t nws, ws_pos;
    /* bulk order: a fault waits for a chunk on the bulk connection only if few chunks
     * are ahead of it there; deeper in a burst, it is asked for urgently */
    uint32_t *bulk_seq;
    uint32_t bulk_asked_seq, bulk_done_seq;
    uint64_t chunks_waited; /* faults that waited for a chunk already on its way */
};

/* c->asked[k]: the chunk is on its way, so a fault there waits for it */
enum { ASK_NONE = 0, ASK_URGENT = 1, ASK_BULK = 2 };
#define BULK_WAIT 32 /* chunks ahead on the bulk connection a fault may wait behind */

#define CHAN_STALL_NS (3ULL * 1000000000ULL)

static int chan_connect(const char *host, int port, const uint8_t token[16], uint32_t kind)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    if (getaddrinfo(host, portstr, &hints, &res) != 0 || !res)
        return -1;
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {5, 0};
    int one = 1, big = 4 << 20;
    if (fd >= 0) {
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if ((kind & 0xff) == 2)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    }
    if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) < 0) {
        if (fd >= 0)
            close(fd);
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    struct {
        char magic[8];
        uint8_t token[16];
        uint32_t kind, zero;
    } hello = {{0}, {0}, kind, 0};
    memcpy(hello.magic, CHAN_MAGIC, 8);
    memcpy(hello.token, token, 16);
    struct {
        char ok[4];
        uint32_t status;
    } reply;
    if (write_full(fd, &hello, sizeof hello) < 0 || read_full(fd, &reply, sizeof reply) < 0 ||
        memcmp(reply.ok, "PWOK", 4) != 0 || reply.status != CHAN_OK) {
        int busy = memcmp(reply.ok, "PWOK", 4) == 0 && reply.status == CHAN_BUSY;
        close(fd);
        errno = busy ? EBUSY : EACCES;
        return -1;
    }
    return fd;
}

/* Why the source refused a channel connection, for the log line of the fallback. */
static const char *chan_refusal(int err)
{
    if (err == EACCES)
        return "the source refused the token (unknown, expired, already used or revoked)";
    if (err == EBUSY)
        return "the source's data channel is at its connection limit (per peer or total)";
    return strerror(err);
}

/* The channel failed: every page it owed goes back to Python's queue (gRPC takes over). */
static void chan_down_locked(Engine *e, const char *reason)
{
    struct chan *c = e->chan;
    if (!c || !c->up)
        return;
    c->up = 0;
    snprintf(c->down_reason, sizeof c->down_reason, "%s", reason);
    cache_release(c->cache, e);
    shutdown(c->urgent_fd, SHUT_RDWR);
    if (c->bulk_fd >= 0)
        shutdown(c->bulk_fd, SHUT_RDWR);
    pending_t *items = e->pending.items;
    for (size_t i = 0; i < e->pending.len; i++) {
        region_t *r = &e->regions[items[i].region];
        if ((r->state[items[i].page] & ST_MASK) == ST_REQUESTED)
            queue_request(e, r, items[i].page);
    }
    signal_fd(e->notify_fd);
}

/* Does chunk k still hold a missing data page (in the region of its first page)? */
static int chunk_missing(Engine *e, struct chan *c, uint64_t k)
{
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        uint64_t lo = k * c->chunk_size, hi = lo + c->chunk_size;
        if (hi <= r->offset || lo >= r->offset + r->size)
            continue;
        uint64_t p0 = lo > r->offset ? (lo - r->offset) / r->page_size : 0;
        uint64_t p1 = (hi - r->offset) / r->page_size;
        if (p1 > r->npages)
            p1 = r->npages;
        for (uint64_t p = p0; p < p1; p++)
            if ((r->state[p] & ST_MASK) == ST_MISSING && !page_is_zero_src(r, p))
                return 1;
    }
    return 0;
}

/* Does chunk k still hold a data page that is missing or waited for? */
static int chunk_needed(Engine *e, struct chan *c, uint64_t k)
{
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        uint64_t lo = k * c->chunk_size, hi = lo + c->chunk_size;
        if (hi <= r->offset || lo >= r->offset + r->size)
            continue;
        uint64_t p0 = lo > r->offset ? (lo - r->offset) / r->page_size : 0;
        uint64_t p1 = (hi - r->offset) / r->page_size;
        if (p1 > r->npages)
            p1 = r->npages;
        for (uint64_t p = p0; p < p1; p++) {
            int st = r->state[p] & ST_MASK;
            if ((st == ST_MISSING || st == ST_REQUESTED) && !page_is_zero_src(r, p))
                return 1;
        }
    }
    return 0;
}

static uint64_t chunk_len_of(struct chan *c, uint64_t k)
{
    uint64_t end = (k + 1) * c->chunk_size;
    return (end > c->export_size ? c->export_size : end) - k * c->chunk_size;
}

/* Under the engine lock: a fault's chunk (and, while faults run forward, the chunks its
 * window reaches) goes to the outbox; nothing is written or hashed here. A chunk already
 * on its way, urgent or bulk, is waited for, never fetched twice. */
static int chan_request_locked(Engine *e, region_t *r, uint64_t p)
{
    struct chan *c = e->chan;
    if (!c || !c->up)
        return 0;
    uint64_t chunk = (r->offset + p * r->page_size) / c->chunk_size;
    if (chunk >= c->nchunks)
        return 0;
    if (c->asked[chunk] == ASK_URGENT || (c->asked[chunk] == ASK_BULK &&
                                          c->bulk_seq[chunk] - c->bulk_done_seq < BULK_WAIT)) {
        c->chunks_waited++;
        return 1;
    }
    uint64_t ahead = e->window * r->page_size / c->chunk_size;
    uint32_t n = 0;
    for (uint64_t k = chunk; k < c->nchunks && k <= chunk + (ahead > 8 ? 8 : ahead); k++) {
        if (c->nout >= CHAN_MAX_REQ)
            break;
        if ((k == chunk && c->asked[k] != ASK_URGENT) || (!c->asked[k] && chunk_missing(e, c, k))) {
            c->outbox[c->nout++] = k;
            c->asked[k] = ASK_URGENT;
            record_offset(e, k * c->chunk_size); /* fault-around: the touch it predicts */
            n++;
        }
    }
    if (n == 0)
        return 0; /* the outbox is full: Python takes this one */
    if (c->outstanding == 0)
        c->last_answer_ns = now_ns();
    c->outstanding += n;
    return 1;
}

static void chan_install_run(Engine *e, const uint64_t *index, size_t n, const uint8_t *buf,
                             int kind, int wait);
static void chan_fail(Engine *e, const char *why);

/* The fault thread, without the engine lock: install what the host's cache holds, send
 * the rest of the outbox on the urgent connection. */
static void chan_flush_urgent(Engine *e)
{
    struct chan *c = e->chan;
    if (!c)
        return;
    pthread_mutex_lock(&e->lock);
    uint32_t n = c->up ? c->nout : 0;
    memcpy(c->sendbuf, c->outbox, n * sizeof(uint64_t));
    c->nout = 0;
    pthread_mutex_unlock(&e->lock);
    if (n == 0)
        return;
    ChunkCache *cache = __atomic_load_n(&c->cache, __ATOMIC_ACQUIRE);
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t k = c->sendbuf[i], len = chunk_len_of(c, k);
        if (cache && cache_take(cache, c->digests + k * 32, c->hitbuf, (uint32_t)len, e, 0) ==
                         CACHE_READY) {
            __atomic_add_fetch(&c->chunks_cached, 1, __ATOMIC_RELAXED);
            /* the fault thread cannot wait for events it drains itself: if the install
             * stops short, the chunk is asked for over the network as usual */
            chan_install_run(e, &k, 1, c->hitbuf, KIND_PREFETCH, 0);
            pthread_mutex_lock(&e->lock);
            int short_of = chunk_needed(e, c, k);
            if (short_of)
                c->asked[k] = ASK_URGENT;
            else
                c->outstanding--;
            pthread_mutex_unlock(&e->lock);
            if (!short_of)
                continue;
        }
        c->sendbuf[m++] = k;
    }
    uint32_t head[2] = {m, 0};
    if (m && (write_full(c->urgent_fd, head, sizeof head) < 0 ||
              write_full(c->urgent_fd, c->sendbuf, m * 8) < 0))
        chan_fail(e, "urgent request failed");
}

/* The chunk matches what the export published: its fast digest when Describe carried
 * one, its SHA-256 otherwise (an older source). */
static int chan_verify(struct chan *c, uint64_t index, const uint8_t *buf, uint64_t len)
{
    if (c->fast) {
        uint8_t d[16];
        fast_digest(buf, len, d);
        return memcmp(d, c->fast + index * 16, 16) == 0;
    }
    uint8_t d[32];
    sha256(buf, len, d);
    return memcmp(d, c->digests + index * 32, 32) == 0;
}

/* Read one answer into buf (the whole chunk, zero pages filled in) and verify it. */
static int64_t chan_receive(struct chan *c, int fd, uint8_t *buf, uint8_t *stage,
                            uint64_t *len_out, const char **why)
{
    chan_answer_t a;
    if (read_full(fd, &a, sizeof a) < 0) {
        *why = "connection lost";
        return -1;
    }
    int zstd = (a.status & CHAN_ZSTD) != 0;
    a.status &= 0xffff;
    if (a.status != CHAN_OK || a.index >= c->nchunks || (zstd && !c->compress)) {
        *why = a.status == CHAN_STALE ? "export stale" : "refused or out of range";
        return -1;
    }
    uint64_t per = c->chunk_size / c->export_ps, first = a.index * per;
    uint64_t npages = c->export_size / c->export_ps;
    uint64_t last = first + per < npages ? first + per : npages, expect = 0;
    for (uint64_t p = first; p < last; p++)
        expect += c->zmap[p] ? 0 : c->export_ps;
    int whole = expect == (last - first) * c->export_ps; /* no zero page: read in place */
    if (zstd) {
        uint8_t *packed = buf + c->chunk_size; /* buf has room for one packed chunk */
        if (a.data_len > c->chunk_size + 4096 || read_full(fd, packed, a.data_len) < 0 ||
            zstd_unpack(whole ? buf : stage, expect, packed, a.data_len) != (int64_t)expect) {
            *why = "bad compressed chunk";
            return -1;
        }
    } else if (a.data_len != expect || read_full(fd, whole ? buf : stage, a.data_len) < 0) {
        *why = a.data_len != expect ? "wrong chunk size" : "connection lost";
        return -1;
    }
    __atomic_add_fetch(&c->bytes_raw, expect, __ATOMIC_RELAXED);
    uint64_t used = 0;
    for (uint64_t p = first; p < last && !whole; p++) {
        uint8_t *dst = buf + (p - first) * c->export_ps;
        if (c->zmap[p]) {
            memset(dst, 0, c->export_ps);
        } else {
            memcpy(dst, stage + used, c->export_ps);
            used += c->export_ps;
        }
    }
    *len_out = (last - first) * c->export_ps;
    __atomic_add_fetch(&c->bytes_received, a.data_len, __ATOMIC_RELAXED);
    if (!chan_verify(c, a.index, buf, *len_out)) {
        __atomic_add_fetch(&c->digest_failures, 1, __ATOMIC_RELAXED);
        *why = "digest mismatch";
        return -1;
    }
    return (int64_t)a.index;
}

/* Install chunks received into one buffer, chunk i at buf + i * chunk_size (consecutive
 * indexes go in with one copy per run), and forget that they were asked for. */
static void chan_install_run(Engine *e, const uint64_t *index, size_t n, const uint8_t *buf,
                             int kind, int wait)
{
    struct chan *c = e->chan;
    pthread_mutex_lock(&e->lock);
    int notify = 0;
    if (e->state == E_RUNNING) {
        for (size_t i = 0; i < n;) {
            size_t j = i + 1;
            while (j < n && index[j] == index[j - 1] + 1)
                j++;
            uint64_t off = index[i] * c->chunk_size;
            uint64_t end = (index[j - 1] + 1) * c->chunk_size;
            if (end > c->export_size)
                end = c->export_size;
            install_image_range(e, off, buf + i * c->chunk_size, end - off, kind, wait);
            i = j;
        }
        settle_pending(e);
        notify = all_done(e);
    }
    for (size_t i = 0; i < n; i++)
        c->asked[index[i]] = ASK_NONE;
    pthread_mutex_unlock(&e->lock);
    if (notify)
        signal_fd(e->ctl_fd);
}

static void chan_fail(Engine *e, const char *why)
{
    pthread_mutex_lock(&e->lock);
    if (e->state == E_RUNNING)
        chan_down_locked(e, why);
    pthread_mutex_unlock(&e->lock);
}

static void *chan_urgent_thread(void *arg)
{
    Engine *e = arg;
    struct chan *c = e->chan;
    uint8_t *buf = malloc(2 * c->chunk_size + 4096), *stage = malloc(c->chunk_size);
    while (buf && stage && __atomic_load_n(&c->up, __ATOMIC_ACQUIRE) &&
           e->state == E_RUNNING) {
        struct pollfd pfd = {c->urgent_fd, POLLIN, 0};
        if (poll(&pfd, 1, 200) == 0) {
            pthread_mutex_lock(&e->lock);
            int stalled = c->outstanding && now_ns() - c->last_answer_ns > CHAN_STALL_NS;
            if (stalled)
                chan_down_locked(e, "urgent answers stalled");
            pthread_mutex_unlock(&e->lock);
            continue;
        }
        const char *why = "";
        uint64_t len = 0;
        int64_t index = chan_receive(c, c->urgent_fd, buf, stage, &len, &why);
        if (index < 0) {
            chan_fail(e, why);
            break;
        }
        pthread_mutex_lock(&e->lock);
        c->outstanding--;
        c->last_answer_ns = now_ns();
        c->chunks_urgent++;
        pthread_mutex_unlock(&e->lock);
        uint64_t k = (uint64_t)index;
        chan_install_run(e, &k, 1, buf, KIND_PREFETCH, 1); /* asked-for pages count as faults */
        cache_fill(__atomic_load_n(&c->cache, __ATOMIC_ACQUIRE), c->digests + k * 32, buf,
                   (uint32_t)len);
    }
    free(buf);
    free(stage);
    return NULL;
}

/* The next chunks of the bulk pass that still hold a missing data page and are not on
 * their way already; marks them ASK_BULK. The cursor only advances (each call looks at a
 * bounded stretch under the lock), so a pass is linear in the image. */
#define BULK_SCAN 1024
static size_t chan_next_bulk(Engine *e, uint64_t *out, size_t max)
{
    struct chan *c = e->chan;
    size_t n = 0;
    pthread_mutex_lock(&e->lock);
    for (; n < max && c->ws_pos < c->nws; c->ws_pos++) {
        uint64_t k = c->ws[c->ws_pos];
        if (k < c->nchunks && !c->asked[k] && chunk_missing(e, c, k)) {
            c->asked[k] = ASK_BULK;
            out[n++] = k;
        }
    }
    if (!c->background) { /* only the working set comes this way */
        pthread_mutex_unlock(&e->lock);
        return n;
    }
    for (uint64_t seen = 0; n < max && seen < BULK_SCAN && c->bulk_cursor < c->nchunks; seen++) {
        uint64_t k = c->bulk_cursor++;
        if (!c->asked[k] && chunk_missing(e, c, k)) {
            c->asked[k] = ASK_BULK;
            out[n++] = k;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

static void chan_unask(Engine *e, const uint64_t *index, size_t n)
{
    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < n; i++)
        e->chan->asked[index[i]] = ASK_NONE;
    pthread_mutex_unlock(&e->lock);
}

static int chan_send_batch(int fd, const uint64_t *idx, size_t n)
{
    uint32_t head[2] = {(uint32_t)n, 0};
    return write_full(fd, head, sizeof head) < 0 || write_full(fd, idx, n * 8) < 0 ? -1 : 0;
}

/* Bulk work yields the CPU to demand faults when they wake up, but keeps its fair share:
 * SCHED_BATCH, not a nice level (a niced bulk thread starves on a busy host, and a fault
 * waiting for a chunk already on the bulk connection would starve with it). */
static void bulk_priority(void)
{
    struct sched_param sp = {0};
    sched_setscheduler((pid_t)syscall(SYS_gettid), SCHED_BATCH, &sp);
}

/* Install what the host's cache holds, skip what another session is fetching (a later
 * pass comes back to it), and claim the rest; returns how many chunks are left to fetch
 * (compacted into want). */
static size_t chan_bulk_from_cache(Engine *e, uint64_t *want, size_t n, uint8_t *buf,
                                   size_t *deferred)
{
    struct chan *c = e->chan;
    ChunkCache *cache = __atomic_load_n(&c->cache, __ATOMIC_ACQUIRE);
    if (!cache)
        return n;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t k = want[i], len = chunk_len_of(c, k);
        int st = cache_take(cache, c->digests + k * 32, buf, (uint32_t)len, e, 1);
        if (st == CACHE_READY) {
            __atomic_add_fetch(&c->chunks_cached, 1, __ATOMIC_RELAXED);
            chan_install_run(e, &k, 1, buf, KIND_BACKGROUND, 1);
        } else if (st == CACHE_PENDING) {
            (*deferred)++;
            chan_unask(e, &k, 1);
        } else {
            want[m++] = k;
        }
    }
    return m;
}

/* Is more of an answer already waiting on fd (so an install can wait to batch it)? */
static int readable_now(int fd)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    return poll(&pfd, 1, 0) > 0;
}

#define BULK_DEPTH_BYTES (2u << 20) /* requested ahead: bounds what a fault may wait behind */
#define BULK_RUN_BYTES (1u << 20)   /* received before one install */

typedef struct {
    uint64_t *fifo; /* asked for, in order */
    size_t head, count, cap, depth;
    uint64_t *run; /* received, not yet installed: indexes of buf's chunks */
    size_t nrun, run_cap;
    uint8_t *buf, *stage;
} bulk_t;

/* Install the received run (then keep it in the host's cache, outside the engine lock). */
static void bulk_flush(Engine *e, bulk_t *b)
{
    struct chan *c = e->chan;
    if (b->nrun == 0)
        return;
    chan_install_run(e, b->run, b->nrun, b->buf, KIND_BACKGROUND, 1);
    ChunkCache *cache = __atomic_load_n(&c->cache, __ATOMIC_ACQUIRE);
    for (size_t i = 0; cache && i < b->nrun; i++)
        cache_fill(cache, c->digests + b->run[i] * 32, b->buf + i * c->chunk_size,
                   (uint32_t)chunk_len_of(c, b->run[i]));
    b->nrun = 0;
}

/* Ask for more while less than the depth is on its way; returns -1 if the request fails,
 * else how many chunks were asked for. */
static int bulk_top_up(Engine *e, bulk_t *b, size_t *deferred)
{
    struct chan *c = e->chan;
    size_t limit = c->ws_pos < c->nws ? b->cap : b->depth; /* the working set: one burst */
    if (b->count >= limit)
        return 0;
    size_t room = limit - b->count;
    if (room < limit / 2 && b->count > 0)
        return 0; /* ask in batches of at least half the depth */
    uint64_t want[CHAN_MAX_REQ];
    size_t n = chan_next_bulk(e, want, room < CHAN_MAX_REQ ? room : CHAN_MAX_REQ);
    n = chan_bulk_from_cache(e, want, n, b->stage, deferred); /* buf may hold a run */
    if (n == 0)
        return 0;
    pthread_mutex_lock(&e->lock);
    for (size_t i = 0; i < n; i++)
        c->bulk_seq[want[i]] = ++c->bulk_asked_seq;
    pthread_mutex_unlock(&e->lock);
    if (chan_send_batch(c->bulk_fd, want, n) < 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        b->fifo[(b->head + b->count + i) % b->cap] = want[i];
    b->count += n;
    return (int)n;
}

static void *chan_bulk_thread(void *arg)
{
    Engine *e = arg;
    bulk_priority();
    struct chan *c = e->chan;
    bulk_t b = {0};
    b.depth = BULK_DEPTH_BYTES / c->chunk_size;
    b.depth = b.depth < 2 ? 2 : b.depth > CHAN_MAX_REQ ? CHAN_MAX_REQ : b.depth;
    b.cap = c->nws > b.depth ? (c->nws > CHAN_MAX_REQ ? CHAN_MAX_REQ : c->nws) : b.depth;
    b.run_cap = BULK_RUN_BYTES / c->chunk_size;
    b.run_cap = b.run_cap < 1 ? 1 : b.run_cap;
    b.fifo = malloc(b.cap * sizeof(uint64_t));
    b.run = malloc(b.run_cap * sizeof(uint64_t));
    /* one more chunk of room: a packed answer is read just past the slot it unpacks into */
    b.buf = malloc((b.run_cap + 1) * c->chunk_size + 4096);
    b.stage = malloc(c->chunk_size);
    const char *why = NULL;
    size_t idle_passes = 0, sent_this_pass = 0;
    while (b.fifo && b.run && b.buf && b.stage && c->up && e->state == E_RUNNING && !why) {
        size_t deferred = 0;
        int asked = bulk_top_up(e, &b, &deferred);
        if (asked < 0) {
            why = "bulk request failed";
            break;
        }
        sent_this_pass += (size_t)asked;
        if (b.count == 0) {
            pthread_mutex_lock(&e->lock);
            int pass_over = c->bulk_cursor >= c->nchunks, done = all_done(e);
            if (!c->background && c->ws_pos >= c->nws)
                done = 1; /* the working set is in: faults take the urgent way */
            if (pass_over)
                c->bulk_cursor = 0; /* go round again for what was on its way or deferred */
            pthread_mutex_unlock(&e->lock);
            if (done)
                break;
            if (pass_over) {
                idle_passes = sent_this_pass ? 0 : idle_passes + 1;
                sent_this_pass = 0;
                if (idle_passes) { /* only urgent answers are owed: let them land */
                    struct timespec ts = {0, 2 * 1000000};
                    nanosleep(&ts, NULL);
                }
            }
            continue;
        }
        uint64_t len = 0;
        uint64_t expect = b.fifo[b.head];
        int64_t index = chan_receive(c, c->bulk_fd, b.buf + b.nrun * c->chunk_size, b.stage,
                                     &len, &why);
        if (index < 0)
            break;
        if ((uint64_t)index != expect) {
            why = "bulk answer out of order";
            break;
        }
        b.head = (b.head + 1) % b.cap;
        b.count--;
        __atomic_add_fetch(&c->chunks_bulk, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&c->bulk_done_seq, 1, __ATOMIC_RELAXED);
        b.run[b.nrun++] = (uint64_t)index;
        int next_follows = b.count > 0 && b.fifo[b.head] == (uint64_t)index + 1;
        /* a fault may be waiting for this run: do not hold it back to batch more */
        int waited = __atomic_load_n(&e->pending.len, __ATOMIC_RELAXED) > 0;
        if (b.nrun == b.run_cap || !next_follows || waited || !readable_now(c->bulk_fd))
            bulk_flush(e, &b);
    }
    bulk_flush(e, &b);
    if (why)
        chan_fail(e, why);
    free(b.fifo);
    free(b.run);
    free(b.buf);
    free(b.stage);
    return NULL;
}

static void chan_stop(Engine *e)
{
    struct chan *c = e->chan;
    if (!c)
        return;
    pthread_mutex_lock(&e->lock);
    c->up = 0;
    pthread_mutex_unlock(&e->lock);
    shutdown(c->urgent_fd, SHUT_RDWR);
    if (c->bulk_fd >= 0)
        shutdown(c->bulk_fd, SHUT_RDWR);
    Py_BEGIN_ALLOW_THREADS if (c->urx_started) pthread_join(c->urx, NULL);
    if (c->bulk_started)
        pthread_join(c->bulk, NULL);
    cache_release(c->cache, e);
    Py_END_ALLOW_THREADS c->urx_started = c->bulk_started = 0;
}

static void chan_free(Engine *e)
{
    struct chan *c = e->chan;
    if (!c)
        return;
    if (c->urgent_fd >= 0)
        close(c->urgent_fd);
    if (c->bulk_fd >= 0)
        close(c->bulk_fd);
    free(c->zmap);
    free(c->digests);
    free(c->fast);
    free(c->asked);
    free(c->hitbuf);
    free(c->outbox);
    free(c->sendbuf);
    free(c->ws);
    free(c->bulk_seq);
    Py_XDECREF((PyObject *)c->cache);
    free(c);
    e->chan = NULL;
}

/* The channel's threads run only while the engine does. */
static void chan_start_threads(Engine *e)
{
    struct chan *c = e->chan;
    if (!c || c->urx_started)
        return;
    c->urx_started = pthread_create(&c->urx, NULL, chan_urgent_thread, e) == 0;
    if (c->background || c->nws)
        c->bulk_started = pthread_create(&c->bulk, NULL, chan_bulk_thread, e) == 0;
}

static PyObject *Engine_attach_channel(Engine *e, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host",     "port",    "token",      "chunk_size",  "export_size",
                             "export_page_size", "zero_map", "digests", "background",
                             "compression", "cache", "fast_digests", "working_set", NULL};
    const char *host;
    int port, background = 1, compression = 0;
    PyObject *cache_obj = Py_None;
    Py_buffer tok, zm, dg, fd = {0}, ws = {0};
    unsigned long long cs, size, eps;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "siy*KKKy*y*|ppOz*z*", kwlist, &host, &port,
                                     &tok, &cs, &size, &eps, &zm, &dg, &background, &compression,
                                     &cache_obj, &fd, &ws))
        return NULL;
    PyObject *result = NULL;
    uint64_t nchunks = cs ? (size + cs - 1) / cs : 0;
    if (cache_obj != Py_None && !PyObject_TypeCheck(cache_obj, &ChunkCacheType)) {
        PyErr_SetString(PyExc_TypeError, "cache must be a ChunkCache or None");
        goto out;
    }
    if (e->chan || e->state > E_RUNNING || tok.len != 16 || eps == 0 || cs % eps ||
        size % eps || (uint64_t)zm.len != size / eps || (uint64_t)dg.len != nchunks * 32 ||
        (fd.buf && (uint64_t)fd.len != nchunks * 16) || (ws.buf && ws.len % 8)) {
        PyErr_SetString(PyExc_ValueError, "bad channel description (or engine not running)");
        goto out;
    }
    int ufd, bfd = -1;
    uint8_t token[16];
    memcpy(token, tok.buf, 16);
    uint32_t zflag = compression && zstd_compress_fn ? CHAN_ZSTD : 0;
    int want_bulk = background || (ws.buf && ws.len > 0);
    Py_BEGIN_ALLOW_THREADS ufd = chan_connect(host, port, token, 1 | zflag);
    if (ufd >= 0 && want_bulk)
        bfd = chan_connect(host, port, token, 2 | zflag);
    Py_END_ALLOW_THREADS if (ufd < 0 || (want_bulk && bfd < 0))
    {
        if (ufd >= 0)
            close(ufd);
        PyErr_Format(PyExc_ConnectionError, "native channel to %s:%d: %s", host, port,
                     chan_refusal(errno));
        goto out;
    }
    struct chan *c = calloc(1, sizeof *c);
    c->urgent_fd = ufd, c->bulk_fd = bfd, c->background = background, c->compress = zflag != 0;
    c->chunk_size = cs, c->export_size = size, c->export_ps = eps, c->nchunks = nchunks;
    c->zmap = malloc((size_t)zm.len + 1);
    memcpy(c->zmap, zm.buf, (size_t)zm.len);
    c->digests = malloc((size_t)dg.len + 1);
    memcpy(c->digests, dg.buf, (size_t)dg.len);
    c->asked = calloc(nchunks + 1, 1);
    c->hitbuf = malloc(cs);
    c->outbox = malloc(CHAN_MAX_REQ * sizeof(uint64_t));
    c->bulk_seq = calloc(nchunks + 1, sizeof(uint32_t));
    c->sendbuf = malloc(CHAN_MAX_REQ * sizeof(uint64_t));
    if (fd.buf && fd.len) {
        c->fast = malloc((size_t)fd.len);
        memcpy(c->fast, fd.buf, (size_t)fd.len);
    }
    if (ws.buf && ws.len) {
        c->nws = (uint64_t)ws.len / 8;
        c->ws = malloc((size_t)ws.len);
        memcpy(c->ws, ws.buf, (size_t)ws.len);
    }
    if (cache_obj != Py_None) {
        Py_INCREF(cache_obj);
        c->cache = (ChunkCache *)cache_obj;
    }
    pthread_mutex_lock(&e->lock);
    e->chan = c;
    c->up = 1;
    pthread_mutex_unlock(&e->lock);
    if (e->state == E_RUNNING)
        chan_start_threads(e);
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&tok);
    PyBuffer_Release(&zm);
    PyBuffer_Release(&dg);
    if (fd.buf)
        PyBuffer_Release(&fd);
    if (ws.buf)
        PyBuffer_Release(&ws);
    return result;
}

/* Start sharing chunks through the host's cache (once another session wants them too). */
static PyObject *Engine_share_cache(Engine *e, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &ChunkCacheType))
        return PyErr_Format(PyExc_TypeError, "a ChunkCache is needed");
    struct chan *c = e->chan;
    if (!c || c->cache)
        Py_RETURN_FALSE;
    Py_INCREF(arg);
    pthread_mutex_lock(&e->lock);
    __atomic_store_n(&c->cache, (ChunkCache *)arg, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_TRUE;
}

static PyObject *Engine_get_channel(Engine *e, void *unused)
{
    struct chan *c = e->chan;
    if (!c)
        Py_RETURN_NONE;
    pthread_mutex_lock(&e->lock);
    PyObject *d = Py_BuildValue(
        "{sOsssKsKsKsKsK}", "up", c->up ? Py_True : Py_False, "down_reason", c->down_reason,
        "chunks_cached", (unsigned long long)c->chunks_cached,
        "bytes_received", (unsigned long long)c->bytes_received, "digest_failures",
        (unsigned long long)c->digest_failures, "chunks_urgent",
        (unsigned long long)c->chunks_urgent, "chunks_bulk", (unsigned long long)c->chunks_bulk);
    pthread_mutex_unlock(&e->lock);
    return d;
}

/* Start recording the chunks (of unit bytes, over an image of size bytes) the workload
 * touches, in first-touch order; both transports. */
static PyObject *Engine_record_working_set(Engine *e, PyObject *args)
{
    unsigned long long unit, size;
    if (!PyArg_ParseTuple(args, "KK", &unit, &size))
        return NULL;
    uint64_t n = unit ? (size + unit - 1) / unit : 0;
    if (unit == 0 || n == 0 || n > (1ULL << 32))
        return PyErr_Format(PyExc_ValueError, "bad working-set geometry");
    uint8_t *seen = calloc(n, 1);
    uint64_t *order = malloc(n * sizeof(uint64_t));
    if (!seen || !order) {
        free(seen);
        free(order);
        return PyErr_NoMemory();
    }
    pthread_mutex_lock(&e->lock);
    free(e->ws_seen);
    free(e->ws_order);
    e->ws_seen = seen, e->ws_order = order;
    e->ws_unit = unit, e->ws_chunks = n, e->ws_len = 0;
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
}

static PyObject *Engine_working_set(Engine *e, PyObject *unused)
{
    pthread_mutex_lock(&e->lock);
    size_t n = e->ws_order ? e->ws_len : 0;
    uint64_t *copy = malloc((n ? n : 1) * sizeof(uint64_t));
    if (copy && n)
        memcpy(copy, e->ws_order, n * sizeof(uint64_t));
    pthread_mutex_unlock(&e->lock);
    if (!copy)
        return PyErr_NoMemory();
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++)
        PyList_SET_ITEM(list, (Py_ssize_t)i, PyLong_FromUnsignedLongLong(copy[i]));
    free(copy);
    return list;
}

static PyObject *Engine_install(Engine *e, PyObject *args)
{
    unsigned long long off;
    Py_buffer data;
    int kind;
    if (!PyArg_ParseTuple(args, "Ky*i", &off, &data, &kind))
        return NULL;
    if (kind < 0 || kind > 2) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "kind must be FAULT, PREFETCH or BACKGROUND");
        return NULL;
    }
    uint64_t installed = 0;
    int notify = 0;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&e->lock);
    if (e->state <= E_RUNNING && e->regions) { /* before start too: a staged working set */
        installed = install_image_range(e, off, data.buf, (uint64_t)data.len, kind, 1);
        settle_pending(e);
        notify = all_done(e) || e->state != E_RUNNING;
    }
    pthread_mutex_unlock(&e->lock);
    if (notify)
        signal_fd(e->ctl_fd);
    Py_END_ALLOW_THREADS PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(installed);
}

static PyObject *Engine_take_requests(Engine *e, PyObject *unused)
{
    pthread_mutex_lock(&e->lock);
    size_t n = e->requests.len;
    uint64_t *copy = n ? malloc(n * sizeof(uint64_t)) : NULL;
    if (n && !copy) {  /* keep the requests queued for the next call */
        pthread_mutex_unlock(&e->lock);
        return PyErr_NoMemory();
    }
    if (n)
        memcpy(copy, e->requests.items, n * sizeof(uint64_t));
    e->requests.len = 0;
    pthread_mutex_unlock(&e->lock);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++)
        PyList_SET_ITEM(list, (Py_ssize_t)i, PyLong_FromUnsignedLongLong(copy[i]));
    free(copy);
    return list;
}

/* Counters are copied under the engine lock; Python objects are built after it. */
static PyObject *Engine_stats(Engine *e, PyObject *unused)
{
    struct {
        const char *name;
        uint64_t value;
    } s[28];
    int n = 0;
#define STAT(name_, value_) (s[n].name = (name_), s[n].value = (uint64_t)(value_), n++)
    pthread_mutex_lock(&e->lock);
    STAT("pages_total", e->total);
    STAT("pages_present", e->n_present + e->n_zero);
    STAT("pages_data", e->n_present);
    STAT("pages_zero", e->n_zero);
    STAT("pages_removed", e->n_removed);
    STAT("pages_missing", e->total - e->n_present - e->n_zero - e->n_removed);
    STAT("faults_local", e->faults[RES_LOCAL]);
    STAT("faults_remote", e->faults[RES_REMOTE]);
    STAT("faults_zero", e->faults[RES_ZERO]);
    STAT("faults_pending", e->pending.len);
    STAT("pages_fault", e->pages_by_kind[KIND_FAULT]);
    STAT("pages_prefetched", e->pages_by_kind[KIND_PREFETCH]);
    STAT("pages_background", e->pages_by_kind[KIND_BACKGROUND]);
    STAT("bytes_installed", e->bytes_installed);
    STAT("requests_queued", e->requests.len);
    STAT("events_remove", e->ev_remove);
    STAT("events_unmap", e->ev_unmap);
    STAT("events_remap", e->ev_remap);
    STAT("events_fork", e->ev_fork);
    STAT("copy_eagain", e->copy_eagain);
    STAT("faults_unknown", e->faults_unknown);
    STAT("window_pages", e->window);
    STAT("pages_eexist", e->pages_eexist);
    STAT("channel_up", e->chan ? (uint64_t)e->chan->up : 0);
    STAT("channel_bytes_received", e->chan ? e->chan->bytes_received : 0);
    STAT("channel_digest_failures", e->chan ? e->chan->digest_failures : 0);
    STAT("channel_bytes_raw", e->chan ? e->chan->bytes_raw : 0);
    STAT("channel_chunks_cached", e->chan ? e->chan->chunks_cached : 0);
    pthread_mutex_unlock(&e->lock);
#undef STAT
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(s[i].value);
        if (!v || PyDict_SetItemString(d, s[i].name, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

static PyObject *Engine_histogram(Engine *e, PyObject *arg)
{
    long res = PyLong_AsLong(arg);
    if (res < 0 || res >= NRES) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "resolution must be RES_LOCAL, RES_REMOTE or RES_ZERO");
        return NULL;
    }
    hist_t h;
    pthread_mutex_lock(&e->lock);
    h = e->hist[res];
    pthread_mutex_unlock(&e->lock);
    PyObject *counts = PyList_New(HIST_BUCKETS);
    if (!counts)
        return NULL;
    for (int i = 0; i < HIST_BUCKETS; i++)
        PyList_SET_ITEM(counts, i, PyLong_FromUnsignedLongLong(h.counts[i]));
    return Py_BuildValue("(NKK)", counts, (unsigned long long)h.sum_ns,
                         (unsigned long long)h.max_ns);
}

static PyObject *Engine_page_states(Engine *e, PyObject *unused)
{
    pthread_mutex_lock(&e->lock);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)e->total);
    if (out) {
        char *p = PyBytes_AS_STRING(out);
        for (int i = 0; i < e->nregions; i++) {
            memcpy(p, e->regions[i].state, e->regions[i].npages);
            p += e->regions[i].npages;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return out;
}

/* Stop the session from Python: join the fault thread, poison what is still
 * missing if asked, unregister and close. Returns False if poison was asked
 * for but the kernel has no UFFDIO_POISON (probed: before 6.6); the uffd is
 * then left open so the caller can kill the workload before unregistering. */
static PyObject *Engine_fail(Engine *e, PyObject *args)
{
    const char *code;
    int poison;
    if (!PyArg_ParseTuple(args, "sp", &code, &poison))
        return NULL;
    chan_stop(e);
    join_thread(e);
    int poisoned = 1;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&e->lock);
    if (e->state == E_RUNNING || e->state == E_CREATED) {
        e->state = E_FAILED;
        snprintf(e->error, sizeof e->error, "%s", code);
        if (e->uffd >= 0 && poison)
            poisoned = poison_missing(e) == 0;
        if (e->uffd >= 0 && (poisoned || !poison))
            close_uffd(e);
    }
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS signal_fd(e->notify_fd);
    return PyBool_FromLong(poisoned);
}

static PyObject *Engine_close_uffd(Engine *e, PyObject *unused)
{
    chan_stop(e);
    join_thread(e);
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&e->lock);
    if (e->uffd >= 0) {
        close(e->uffd); /* without unregistering: the caller keeps the workload alive */
        e->uffd = -1;
    }
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *Engine_wake_all(Engine *e, PyObject *unused)
{
    pthread_mutex_lock(&e->lock);
    for (int i = 0; e->uffd >= 0 && i < e->nregions; i++) {
        struct uffdio_range w = {e->regions[i].base, e->regions[i].size};
        ioctl(e->uffd, UFFDIO_WAKE, &w);
    }
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
}

/* Bitmap (LSB first) of the chunks that still hold a missing page the source has data
 * for: what a bulk stream should still bring. */
static PyObject *Engine_wanted_chunks(Engine *e, PyObject *args)
{
    unsigned long long chunk, size;
    if (!PyArg_ParseTuple(args, "KK", &chunk, &size))
        return NULL;
    if (chunk == 0 || size == 0)
        return PyErr_Format(PyExc_ValueError, "chunk size and image size must be positive");
    uint64_t nchunks = (size + chunk - 1) / chunk;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((nchunks + 7) / 8));
    if (!out)
        return NULL;
    uint8_t *bits = (uint8_t *)PyBytes_AS_STRING(out);
    memset(bits, 0, (nchunks + 7) / 8);
    pthread_mutex_lock(&e->lock);
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        for (uint64_t p = 0; p < r->npages; p++) {
            int st = r->state[p] & ST_MASK;
            if ((st == ST_MISSING || st == ST_REQUESTED) && !page_is_zero_src(r, p)) {
                uint64_t off = r->offset + p * r->page_size; /* a huge page spans chunks */
                for (uint64_t c = off / chunk; c <= (off + r->page_size - 1) / chunk; c++)
                    if (c < nchunks)
                        bits[c / 8] |= (uint8_t)(1u << (c % 8));
            }
        }
    }
    pthread_mutex_unlock(&e->lock);
    return out;
}

/* Restart reconciliation: pages the workload already has (pagemap present or swapped)
 * are marked present. Returns the number of pages marked. */
static PyObject *Engine_reconcile_pagemap(Engine *e, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    if (pid <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "pid must be positive");
        return NULL;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/pagemap", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    uint64_t marked = 0;
    int err = 0;
    uint64_t *entries = malloc(4096 * sizeof(uint64_t));
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&e->lock);
    for (int i = 0; i < e->nregions && !err; i++) {
        region_t *r = &e->regions[i];
        uint64_t per = r->page_size / e->sys_page; /* pagemap has one entry per small page */
        uint64_t batch = per == 1 ? 4096 : 1;
        for (uint64_t p = 0; p < r->npages && !err; p += batch) {
            uint64_t n = r->npages - p < batch ? r->npages - p : batch;
            uint64_t first = (r->base + p * r->page_size) / e->sys_page;
            ssize_t got = pread(fd, entries, n * 8, (off_t)(first * 8));
            if (got < (ssize_t)(n * 8)) {
                err = got < 0 ? errno : EIO;
                break;
            }
            for (uint64_t k = 0; k < n; k++)
                if ((entries[k] >> 63) & 1 || (entries[k] >> 62) & 1) {
                    set_state(e, r, p + k, ST_PRESENT);
                    marked++;
                }
        }
    }
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS free(entries);
    close(fd);
    if (err) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    return PyLong_FromUnsignedLongLong(marked);
}

static PyObject *Engine_close(Engine *e, PyObject *unused)
{
    chan_stop(e);
    join_thread(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_get_state(Engine *e, void *c) { return PyUnicode_FromString(state_names[e->state]); }
static PyObject *Engine_get_error(Engine *e, void *c)
{
    if (!e->error[0])
        Py_RETURN_NONE;
    return PyUnicode_FromString(e->error);
}
static PyObject *Engine_get_features(Engine *e, void *c) { return PyLong_FromUnsignedLongLong(e->features); }
static PyObject *Engine_get_uffd(Engine *e, void *c) { return PyLong_FromLong(e->uffd); }

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the fault thread."},
    {"install", (PyCFunction)Engine_install, METH_VARARGS, "Install image bytes (GIL released)."},
    {"take_requests", (PyCFunction)Engine_take_requests, METH_NOARGS, "Drain the request queue."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters."},
    {"histogram", (PyCFunction)Engine_histogram, METH_O, "Fault latency histogram."},
    {"page_states", (PyCFunction)Engine_page_states, METH_NOARGS, "One byte per page."},
    {"fail", (PyCFunction)Engine_fail, METH_VARARGS, "Fail the session (optionally poison)."},
    {"close_uffd", (PyCFunction)Engine_close_uffd, METH_NOARGS, "Stop and close without unregistering."},
    {"wake_all", (PyCFunction)Engine_wake_all, METH_NOARGS, "UFFDIO_WAKE every region."},
    {"record_working_set", (PyCFunction)Engine_record_working_set, METH_VARARGS,
     "record_working_set(chunk_size, image_size): record first-touched chunks."},
    {"working_set", (PyCFunction)Engine_working_set, METH_NOARGS,
     "The chunks touched so far, in first-touch order."},
    {"wanted_chunks", (PyCFunction)Engine_wanted_chunks, METH_VARARGS,
     "Bitmap of chunks still holding missing data pages."},
    {"reconcile_pagemap", (PyCFunction)Engine_reconcile_pagemap, METH_O,
     "Mark pages the workload already has (from /proc/PID/pagemap) present."},
    {"share_cache", (PyCFunction)Engine_share_cache, METH_O,
     "Share chunks through the host's cache from now on."},
    {"attach_channel", (PyCFunction)(void (*)(void))Engine_attach_channel,
     METH_VARARGS | METH_KEYWORDS, "Fetch remote pages over the native data channel."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Stop the fault thread."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Engine_getset[] = {
    {"state", (getter)Engine_get_state, NULL, "Engine state.", NULL},
    {"error", (getter)Engine_get_error, NULL, "Failure code or None.", NULL},
    {"features", (getter)Engine_get_features, NULL, "Negotiated uffd features.", NULL},
    {"uffd", (getter)Engine_get_uffd, NULL, "The engine's uffd copy (-1 when closed).", NULL},
    {"channel", (getter)Engine_get_channel, NULL, "Native channel counters, or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pagewire._uffd.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One post-copy session: a uffd, its regions and a native fault thread.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* ---- native data channel: the source's server ---------------------------- */

typedef struct {
    int fd, stale, removed, refs; /* refs: connections serving it; freed at 0 once removed */
    uint64_t size, page_size, chunk_size, npages, nchunks;
    uint8_t *zero_map; /* one byte per page */
    dev_t dev;
    ino_t ino;
    struct timespec mtime;
} dexport_t;

/* A grant serves one urgent and one bulk connection (one each), until it expires. Grants
 * are chained in a hash table on their (random) token, so taking or revoking one is O(1). */
typedef struct grant {
    uint8_t token[16];
    int export_id, kinds_left; /* bit 1: urgent, bit 2: bulk */
    uint64_t expires_ns;
    struct grant *next;
} grant_t;

#define GRANT_BUCKETS 4096
#define MAX_CONNS 1024 /* slots; the limit in force is max_conns (set_limits) */
#define CLOSING_MAX 64

typedef struct {
    int fd, active, hello_done;
    uint64_t accepted_ns;
    uint8_t peer[16]; /* the peer's address: connection limits are per peer */
    dexport_t *ex;    /* set while the connection holds a reference on it */
    pthread_t thread;
    struct DataServer *server;
} conn_t;

typedef struct DataServer {
    PyObject_HEAD
    int listen_fd, stop_fd, port, running;
    pthread_t thread;
    pthread_mutex_t lock;
    dexport_t **exports;
    int nexports;
    grant_t **grants; /* GRANT_BUCKETS chains */
    int ngrants;
    conn_t conns[MAX_CONNS];
    uint64_t bytes_sent, chunks_sent, refused;
    /* limits (0: the default) and what they refused */
    int max_conns, per_peer, pending_per_peer, hello_ms;
    uint64_t refused_busy, refused_token, hello_timeouts, evicted;
    int closing[CLOSING_MAX]; /* refused connections, closed once their reply was read */
    uint64_t closing_ns[CLOSING_MAX];
    int nclosing;
} DataServer;

#define LIMIT_OR(v, d) ((v) > 0 ? (v) : (d))
#define SRV_MAX_CONNS(s) (LIMIT_OR((s)->max_conns, 256) > MAX_CONNS ? MAX_CONNS : LIMIT_OR((s)->max_conns, 256))

/* ---- data server: grants (hash on the token), export references ---- */

static unsigned grant_bucket(const uint8_t token[16])
{
    uint32_t h;
    memcpy(&h, token, 4);
    return h % GRANT_BUCKETS;
}

static void grant_unlink(DataServer *s, grant_t **at)
{
    grant_t *g = *at;
    *at = g->next;
    free(g);
    s->ngrants--;
}

/* The export id a grant gives a connection of this kind, or -1; uses the grant up. */
static int grant_take(DataServer *s, const uint8_t token[16], uint32_t kind)
{
    if (!s->grants || (kind != 1 && kind != 2))
        return -1;
    for (grant_t **at = &s->grants[grant_bucket(token)]; *at; at = &(*at)->next) {
        grant_t *g = *at;
        if (memcmp(g->token, token, 16) != 0)
            continue;
        int id = -1;
        if (now_ns() < g->expires_ns && (g->kinds_left & (int)kind)) {
            id = g->export_id;
            g->kinds_left &= ~(int)kind;
        }
        if (id < 0 || g->kinds_left == 0)
            grant_unlink(s, at);
        return id;
    }
    return -1;
}

static void grants_drop_export(DataServer *s, int id)
{
    for (int b = 0; s->grants && b < GRANT_BUCKETS; b++)
        for (grant_t **at = &s->grants[b]; *at;)
            if ((*at)->export_id == id)
                grant_unlink(s, at);
            else
                at = &(*at)->next;
}

static void grants_free(DataServer *s)
{
    for (int b = 0; s->grants && b < GRANT_BUCKETS; b++)
        while (s->grants[b])
            grant_unlink(s, &s->grants[b]);
    free(s->grants);
    s->grants = NULL;
}

static void export_free(dexport_t *ex)
{
    close(ex->fd);
    free(ex->zero_map);
    free(ex);
}

/* Lock held: the export stops serving; its fd closes once no connection holds it, and
 * the connections that do are shut down now. */
static void export_remove_locked(DataServer *s, dexport_t *ex)
{
    ex->removed = 1;
    for (int i = 0; i < MAX_CONNS; i++)
        if (s->conns[i].ex == ex && __atomic_load_n(&s->conns[i].active, __ATOMIC_ACQUIRE) == 1)
            shutdown(s->conns[i].fd, SHUT_RDWR);
    if (ex->refs == 0)
        export_free(ex);
}

static void export_put(DataServer *s, conn_t *c)
{
    pthread_mutex_lock(&s->lock);
    dexport_t *ex = c->ex;
    c->ex = NULL;
    if (ex && --ex->refs == 0 && ex->removed)
        export_free(ex);
    pthread_mutex_unlock(&s->lock);
}

static dexport_t *server_export_for(DataServer *s, conn_t *c, const uint8_t token[16],
                                    uint32_t kind)
{
    dexport_t *ex = NULL;
    pthread_mutex_lock(&s->lock);
    int id = grant_take(s, token, kind);
    if (id >= 0 && id < s->nexports && s->exports[id] && !s->exports[id]->removed) {
        ex = s->exports[id];
        ex->refs++;
        c->ex = ex;
    }
    pthread_mutex_unlock(&s->lock);
    return ex;
}

/* The hello must come within hello_ms; after it, reads block again. */
static int read_hello(DataServer *s, int fd, void *hello, size_t len)
{
    int ms = LIMIT_OR(s->hello_ms, 2000);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000}, none = {0, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int rc = read_full(fd, hello, len);
    if (rc < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        __atomic_add_fetch(&s->hello_timeouts, 1, __ATOMIC_RELAXED);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    return rc;
}

static int export_unchanged(dexport_t *ex)
{
    struct stat st;
    if (fstat(ex->fd, &st) < 0 || st.st_dev != ex->dev || st.st_ino != ex->ino ||
        (uint64_t)st.st_size != ex->size || st.st_mtim.tv_sec != ex->mtime.tv_sec ||
        st.st_mtim.tv_nsec != ex->mtime.tv_nsec)
        ex->stale = 1;
    return !ex->stale;
}

static int send_answer(int fd, chan_answer_t *a, const uint8_t *data)
{
    return write_full(fd, a, sizeof *a) < 0 || write_full(fd, data, a->data_len) < 0 ? -1 : 0;
}

/* The chunk's non-zero pages, read into buf; returns their length or -1. */
static int64_t read_data_pages(dexport_t *ex, uint64_t first, uint64_t last, uint8_t *buf)
{
    uint64_t used = 0;
    for (uint64_t p = first; p < last; p++) {
        if (ex->zero_map[p])
            continue;
        uint64_t got = 0;
        while (got < ex->page_size) {
            ssize_t n = pread(ex->fd, buf + used + got, ex->page_size - got,
                              (off_t)(p * ex->page_size + got));
            if (n <= 0)
                return -1;
            got += (uint64_t)n;
        }
        used += ex->page_size;
    }
    return (int64_t)used;
}

/* One chunk's non-zero pages: zstd-compressed when asked for and it pays, otherwise
 * straight from the page cache with sendfile. */
static int send_chunk(DataServer *s, int fd, dexport_t *ex, uint64_t index, uint8_t *raw,
                      uint8_t *packed)
{
    chan_answer_t a = {index, 0, CHAN_OK};
    if (index >= ex->nchunks)
        a.status = CHAN_RANGE;
    else if (!export_unchanged(ex))
        a.status = CHAN_STALE;
    if (a.status != CHAN_OK)
        return write_full(fd, &a, sizeof a) < 0 ? -1 : 1;
    uint64_t per = ex->chunk_size / ex->page_size, first = index * per;
    uint64_t last = first + per < ex->npages ? first + per : ex->npages;
    for (uint64_t p = first; p < last; p++)
        a.data_len += ex->zero_map[p] ? 0 : (uint32_t)ex->page_size;
    uint32_t raw_len = a.data_len;
    if (packed && raw_len) {
        int64_t n = read_data_pages(ex, first, last, raw);
        if (n != raw_len)
            return -1;
        int64_t z = zstd_pack(packed, ex->chunk_size + 4096, raw, raw_len);
        int pays = z > 0 && (uint64_t)z < (uint64_t)raw_len * 7 / 8;
        a.data_len = pays ? (uint32_t)z : raw_len;
        a.status |= pays ? CHAN_ZSTD : 0;
        if (send_answer(fd, &a, pays ? packed : raw) < 0)
            return -1;
    } else {
        if (write_full(fd, &a, sizeof a) < 0)
            return -1;
        for (uint64_t p = first; p < last;) {
            if (ex->zero_map[p]) {
                p++;
                continue;
            }
            uint64_t q = p;
            while (q < last && !ex->zero_map[q])
                q++;
            off_t off = (off_t)(p * ex->page_size);
            size_t left = (size_t)((q - p) * ex->page_size);
            while (left) {
                ssize_t n = sendfile(fd, ex->fd, &off, left);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0)
                    return -1;
                left -= (size_t)n;
            }
            p = q;
        }
    }
    __atomic_add_fetch(&s->bytes_sent, a.data_len, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->chunks_sent, 1, __ATOMIC_RELAXED);
    return 0;
}

static void *conn_thread(void *arg)
{
    conn_t *c = arg;
    DataServer *s = c->server;
    struct {
        char magic[8];
        uint8_t token[16];
        uint32_t kind, zero;
    } hello;
    struct {
        char ok[4];
        uint32_t status;
    } reply = {{'P', 'W', 'O', 'K'}, CHAN_OK};
    uint64_t *idx = malloc(CHAN_MAX_REQ * sizeof(uint64_t));
    dexport_t *ex = NULL;
    if (idx && read_hello(s, c->fd, &hello, sizeof hello) == 0 &&
        memcmp(hello.magic, CHAN_MAGIC, 8) == 0)
        ex = server_export_for(s, c, hello.token, hello.kind & 0xff);
    __atomic_store_n(&c->hello_done, 1, __ATOMIC_RELEASE);
    if (!ex) {
        reply.status = CHAN_DENIED;
        __atomic_add_fetch(&s->refused, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->refused_token, 1, __ATOMIC_RELAXED);
    }
    uint8_t *raw = NULL, *packed = NULL;
    if (ex && (hello.kind & CHAN_ZSTD) && zstd_compress_fn) {
        raw = malloc(ex->chunk_size);
        packed = malloc(ex->chunk_size + 4096);
    }
    if (write_full(c->fd, &reply, sizeof reply) == 0 && ex) {
        int one = 1;
        if ((hello.kind & 0xff) == 2)
            bulk_priority();
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        for (;;) {
            uint32_t head[2];
            if (read_full(c->fd, head, sizeof head) < 0 || head[0] == 0 ||
                head[0] > CHAN_MAX_REQ || read_full(c->fd, idx, head[0] * 8) < 0)
                break;
            int rc = 0;
            for (uint32_t i = 0; i < head[0] && rc == 0; i++)
                rc = send_chunk(s, c->fd, ex, idx[i], raw, packed);
            if (rc != 0)
                break; /* a refusal answer was sent, or the peer went away */
        }
    }
    free(idx);
    free(raw);
    free(packed);
    shutdown(c->fd, SHUT_RDWR);
    export_put(s, c);
    __atomic_store_n(&c->active, 2, __ATOMIC_RELEASE); /* finished, waiting to be joined */
    return NULL;
}

static void server_reap(DataServer *s, int all)
{
    for (int i = 0; i < MAX_CONNS; i++) {
        conn_t *c = &s->conns[i];
        int st = __atomic_load_n(&c->active, __ATOMIC_ACQUIRE);
        if (st == 0 || (st == 1 && !all))
            continue;
        if (st == 1)
            shutdown(c->fd, SHUT_RDWR);
        pthread_join(c->thread, NULL);
        close(c->fd);
        c->active = 0;
    }
}

/* ---- data server: admission (hello deadline, per-peer limits, busy refusals) ---- */

static void peer_key(int fd, uint8_t key[16])
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    memset(key, 0, 16);
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0)
        return;
    if (ss.ss_family == AF_INET6)
        memcpy(key, &((struct sockaddr_in6 *)&ss)->sin6_addr, 16);
    else if (ss.ss_family == AF_INET) {
        key[10] = key[11] = 0xff; /* the v4-mapped form, so both families compare */
        memcpy(key + 12, &((struct sockaddr_in *)&ss)->sin_addr, 4);
    }
}

/* Accept thread only: end a connection still waiting for its hello, and free its slot. */
static void evict(DataServer *s, conn_t *c)
{
    shutdown(c->fd, SHUT_RDWR);
    pthread_join(c->thread, NULL);
    close(c->fd);
    c->active = 0;
    __atomic_add_fetch(&s->evicted, 1, __ATOMIC_RELAXED);
}

/* A free slot for a new connection from peer, or NULL (refuse it as busy). Connections
 * that have not said hello are capped per peer, the oldest giving way to a newcomer, so
 * idle connections can neither hold the slots nor lock out a real session. */
static conn_t *server_admit(DataServer *s, const uint8_t peer[16])
{
    int max = SRV_MAX_CONNS(s), per_peer = LIMIT_OR(s->per_peer, 128);
    int pending_cap = LIMIT_OR(s->pending_per_peer, 16);
    int from_peer = 0, pending = 0;
    conn_t *free_slot = NULL, *oldest_peer = NULL, *oldest_any = NULL;
    for (int i = 0; i < max; i++) {
        conn_t *c = &s->conns[i];
        if (c->active == 0) {
            free_slot = free_slot ? free_slot : c;
            continue;
        }
        int waiting = c->active == 1 && !__atomic_load_n(&c->hello_done, __ATOMIC_ACQUIRE);
        if (waiting && (!oldest_any || c->accepted_ns < oldest_any->accepted_ns))
            oldest_any = c;
        if (memcmp(c->peer, peer, 16) != 0)
            continue;
        from_peer++;
        if (waiting) {
            pending++;
            if (!oldest_peer || c->accepted_ns < oldest_peer->accepted_ns)
                oldest_peer = c;
        }
    }
    if (pending >= pending_cap && oldest_peer) {
        evict(s, oldest_peer);
        from_peer--;
        free_slot = free_slot ? free_slot : oldest_peer;
        if (oldest_any == oldest_peer)
            oldest_any = NULL;
    }
    if (from_peer >= per_peer)
        return NULL;
    if (!free_slot && oldest_any) {
        evict(s, oldest_any);
        free_slot = oldest_any;
    }
    return free_slot;
}

/* Close refused connections older than a second (all of them when forced). */
static void closing_sweep(DataServer *s, int all)
{
    uint64_t now = now_ns();
    int kept = 0;
    for (int i = 0; i < s->nclosing; i++) {
        if (all || now - s->closing_ns[i] > 1000000000ULL) {
            close(s->closing[i]);
        } else {
            s->closing[kept] = s->closing[i];
            s->closing_ns[kept++] = s->closing_ns[i];
        }
    }
    s->nclosing = kept;
}

/* The refused side reads PWOK/CHAN_BUSY and names the cause; its fd is kept a moment so
 * the reply is read before the close. */
static void refuse_busy(DataServer *s, int fd)
{
    struct {
        char ok[4];
        uint32_t status;
    } reply = {{'P', 'W', 'O', 'K'}, CHAN_BUSY};
    __atomic_add_fetch(&s->refused, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->refused_busy, 1, __ATOMIC_RELAXED);
    if (send(fd, &reply, sizeof reply, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)sizeof reply) {
        close(fd);
        return;
    }
    shutdown(fd, SHUT_WR);
    if (s->nclosing == CLOSING_MAX)
        closing_sweep(s, 1);
    s->closing[s->nclosing] = fd;
    s->closing_ns[s->nclosing++] = now_ns();
}

static void *accept_thread(void *arg)
{
    DataServer *s = arg;
    struct pollfd fds[2] = {{s->listen_fd, POLLIN, 0}, {s->stop_fd, POLLIN, 0}};
    for (;;) {
        int ready = poll(fds, 2, 250);
        closing_sweep(s, 0);
        if (ready < 0 && errno != EINTR)
            break;
        if (fds[1].revents)
            break;
        if (!(fds[0].revents & POLLIN))
            continue;
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        server_reap(s, 0);
        uint8_t peer[16];
        peer_key(fd, peer);
        conn_t *slot = server_admit(s, peer);
        if (!slot) {
            refuse_busy(s, fd);
            continue;
        }
        slot->fd = fd;
        slot->server = s;
        slot->hello_done = 0;
        slot->ex = NULL;
        slot->accepted_ns = now_ns();
        memcpy(slot->peer, peer, 16);
        slot->active = 1;
        if (pthread_create(&slot->thread, NULL, conn_thread, slot) != 0) {
            slot->active = 0;
            close(fd);
        }
    }
    return NULL;
}

static int DataServer_init(DataServer *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host", "port", NULL};
    const char *host;
    int port;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "si", kwlist, &host, &port))
        return -1;
    if (s->running) {
        PyErr_SetString(PyExc_RuntimeError, "DataServer already started");
        return -1;
    }
    pthread_mutex_init(&s->lock, NULL);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    if (getaddrinfo(host, portstr, &hints, &res) != 0 || !res) {
        PyErr_Format(PyExc_OSError, "cannot resolve %s", host);
        return -1;
    }
    s->listen_fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s->listen_fd < 0 || bind(s->listen_fd, res->ai_addr, res->ai_addrlen) < 0 ||
        listen(s->listen_fd, 64) < 0) {
        int err = errno;
        freeaddrinfo(res);
        if (s->listen_fd >= 0)
            close(s->listen_fd);
        PyErr_Format(PyExc_OSError, "native data channel: cannot listen on %s:%d (--data-port): %s",
                     host, port, err == EADDRINUSE ? "address already in use" : strerror(err));
        return -1;
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(s->listen_fd, (struct sockaddr *)&ss, &sl);
    s->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
    s->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (pthread_create(&s->thread, NULL, accept_thread, s) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->running = 1;
    return 0;
}

static void server_stop(DataServer *s)
{
    if (!s->running)
        return;
    s->running = 0;
    signal_fd(s->stop_fd);
    Py_BEGIN_ALLOW_THREADS pthread_join(s->thread, NULL);
    server_reap(s, 1);
    closing_sweep(s, 1);
    Py_END_ALLOW_THREADS close(s->listen_fd);
    close(s->stop_fd);
}

static void DataServer_dealloc(DataServer *s)
{
    server_stop(s);
    for (int i = 0; i < s->nexports; i++)
        if (s->exports[i])
            export_free(s->exports[i]);
    free(s->exports);
    grants_free(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static void server_remove_export_locked(DataServer *s, int id);

static PyObject *DataServer_add_export(DataServer *s, PyObject *args)
{
    int id, fd;
    unsigned long long size, ps, cs;
    Py_buffer zm;
    if (!PyArg_ParseTuple(args, "iiKKKy*", &id, &fd, &size, &ps, &cs, &zm))
        return NULL;
    struct stat st;
    if (id < 0 || id > 1 << 20 || ps == 0 || cs % ps || size % ps ||
        (uint64_t)zm.len != size / ps || fstat(fd, &st) < 0) {
        PyBuffer_Release(&zm);
        return PyErr_Format(PyExc_ValueError, "bad export description");
    }
    dexport_t *ex = calloc(1, sizeof *ex);
    ex->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    ex->size = size, ex->page_size = ps, ex->chunk_size = cs;
    ex->npages = size / ps, ex->nchunks = (size + cs - 1) / cs;
    ex->zero_map = malloc(ex->npages ? ex->npages : 1);
    memcpy(ex->zero_map, zm.buf, ex->npages);
    ex->dev = st.st_dev, ex->ino = st.st_ino, ex->mtime = st.st_mtim;
    PyBuffer_Release(&zm);
    pthread_mutex_lock(&s->lock);
    if (id >= s->nexports) {
        s->exports = realloc(s->exports, (size_t)(id + 1) * sizeof *s->exports);
        for (int i = s->nexports; i <= id; i++)
            s->exports[i] = NULL;
        s->nexports = id + 1;
    }
    if (s->exports[id]) /* replaced: its grants and connections end with it */
        server_remove_export_locked(s, (int)id);
    s->exports[id] = ex;
    pthread_mutex_unlock(&s->lock);
    Py_RETURN_NONE;
}

/* Lock held: withdraw an export id: its grants are revoked, its live connections shut
 * down, and its fd closed (now, or when the last connection lets go). */
static void server_remove_export_locked(DataServer *s, int id)
{
    dexport_t *ex = s->exports[id];
    s->exports[id] = NULL;
    grants_drop_export(s, id);
    export_remove_locked(s, ex);
}

static PyObject *DataServer_remove_export(DataServer *s, PyObject *arg)
{
    long id = PyLong_AsLong(arg);
    if (id < 0 && PyErr_Occurred())
        return NULL;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&s->lock);
    if (id >= 0 && id < s->nexports && s->exports[id])
        server_remove_export_locked(s, (int)id);
    pthread_mutex_unlock(&s->lock);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *DataServer_grant(DataServer *s, PyObject *args)
{
    Py_buffer tok;
    int id;
    double ttl_s = 60.0;
    if (!PyArg_ParseTuple(args, "y*i|d", &tok, &id, &ttl_s))
        return NULL;
    if (tok.len != 16 || !(ttl_s > 0)) {
        PyBuffer_Release(&tok);
        return PyErr_Format(PyExc_ValueError, "tokens are 16 bytes, lifetimes positive");
    }
    grant_t *g = calloc(1, sizeof *g);
    memcpy(g->token, tok.buf, 16);
    PyBuffer_Release(&tok);
    g->export_id = id;
    g->kinds_left = 1 | 2;
    g->expires_ns = now_ns() + (uint64_t)(ttl_s * 1e9);
    pthread_mutex_lock(&s->lock);
    if (!s->grants)
        s->grants = calloc(GRANT_BUCKETS, sizeof *s->grants);
    unsigned b = grant_bucket(g->token);
    g->next = s->grants[b];
    s->grants[b] = g;
    s->ngrants++;
    pthread_mutex_unlock(&s->lock);
    Py_RETURN_NONE;
}

static PyObject *DataServer_revoke(DataServer *s, PyObject *arg)
{
    Py_buffer tok;
    if (PyObject_GetBuffer(arg, &tok, PyBUF_SIMPLE) < 0)
        return NULL;
    pthread_mutex_lock(&s->lock);
    if (tok.len == 16 && s->grants)
        for (grant_t **at = &s->grants[grant_bucket(tok.buf)]; *at; at = &(*at)->next)
            if (memcmp((*at)->token, tok.buf, 16) == 0) {
                grant_unlink(s, at);
                break;
            }
    pthread_mutex_unlock(&s->lock);
    PyBuffer_Release(&tok);
    Py_RETURN_NONE;
}

static PyObject *DataServer_set_limits(DataServer *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max_conns", "per_peer", "pending_per_peer", "hello_timeout_ms",
                             NULL};
    int max_conns = 0, per_peer = 0, pending = 0, hello_ms = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iiii", kwlist, &max_conns, &per_peer,
                                     &pending, &hello_ms))
        return NULL;
    if (max_conns < 0 || max_conns > MAX_CONNS || per_peer < 0 || pending < 0 || hello_ms < 0)
        return PyErr_Format(PyExc_ValueError, "limits are >= 0 and max_conns <= %d",
                            MAX_CONNS);
    s->max_conns = max_conns, s->per_peer = per_peer;
    s->pending_per_peer = pending, s->hello_ms = hello_ms;
    Py_RETURN_NONE;
}

static PyObject *DataServer_limit_stats(DataServer *s, PyObject *unused)
{
    int conns = 0, grants, exports = 0;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < MAX_CONNS; i++)
        conns += __atomic_load_n(&s->conns[i].active, __ATOMIC_ACQUIRE) == 1;
    grants = s->ngrants;
    for (int i = 0; i < s->nexports; i++)
        exports += s->exports[i] != NULL;
    pthread_mutex_unlock(&s->lock);
    return Py_BuildValue(
        "{sKsKsKsKsisisi}", "refused_busy",
        (unsigned long long)__atomic_load_n(&s->refused_busy, __ATOMIC_RELAXED), "refused_token",
        (unsigned long long)__atomic_load_n(&s->refused_token, __ATOMIC_RELAXED),
        "hello_timeouts",
        (unsigned long long)__atomic_load_n(&s->hello_timeouts, __ATOMIC_RELAXED), "evicted",
        (unsigned long long)__atomic_load_n(&s->evicted, __ATOMIC_RELAXED), "connections", conns,
        "grants", grants, "exports", exports);
}

static PyObject *DataServer_stats(DataServer *s, PyObject *unused)
{
    return Py_BuildValue("{sKsKsK}", "bytes_sent",
                         (unsigned long long)__atomic_load_n(&s->bytes_sent, __ATOMIC_RELAXED),
                         "chunks_sent",
                         (unsigned long long)__atomic_load_n(&s->chunks_sent, __ATOMIC_RELAXED),
                         "refused",
                         (unsigned long long)__atomic_load_n(&s->refused, __ATOMIC_RELAXED));
}

static PyObject *DataServer_close(DataServer *s, PyObject *unused)
{
    server_stop(s);
    Py_RETURN_NONE;
}

static PyObject *DataServer_get_port(DataServer *s, void *c) { return PyLong_FromLong(s->port); }

static PyMethodDef DataServer_methods[] = {
    {"add_export", (PyCFunction)DataServer_add_export, METH_VARARGS,
     "add_export(id, fd, size, page_size, chunk_size, zero_map)"},
    {"remove_export", (PyCFunction)DataServer_remove_export, METH_O, "Stop serving an export."},
    {"grant", (PyCFunction)DataServer_grant, METH_VARARGS, "grant(token16, export_id)"},
    {"revoke", (PyCFunction)DataServer_revoke, METH_O, "Revoke a token."},
    {"set_limits", (PyCFunction)(void (*)(void))DataServer_set_limits, METH_VARARGS | METH_KEYWORDS,
     "set_limits(max_conns, per_peer, pending_per_peer, hello_timeout_ms); 0 keeps the default"},
    {"limit_stats", (PyCFunction)DataServer_limit_stats, METH_NOARGS,
     "Refusals by cause, live connections, grants and exports."},
    {"stats", (PyCFunction)DataServer_stats, METH_NOARGS, "Counters."},
    {"close", (PyCFunction)DataServer_close, METH_NOARGS, "Stop serving."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef DataServer_getset[] = {
    {"port", (getter)DataServer_get_port, NULL, "The port it listens on.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject DataServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pagewire._uffd.DataServer",
    .tp_basicsize = sizeof(DataServer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The source side of the native data channel.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DataServer_init,
    .tp_dealloc = (destructor)DataServer_dealloc,
    .tp_methods = DataServer_methods,
    .tp_getset = DataServer_getset,
};

/* ---- live snapshot by write-protect ------------------------------------------
 *
 * The workload's region is registered in WP mode. Its process is stopped while the whole
 * region is write-protected, so that instant is the snapshot's; then one thread copies
 * pages to the snapshot file in the background (process_vm_readv + pwrite) and lifts the
 * protection of each page once it is copied. A write fault on a page not yet copied is
 * answered by copying that page first, then lifting its protection, which wakes the
 * writer. Every page is copied exactly once, before any write can touch it.
 */

typedef struct {
    PyObject_HEAD
    int uffd, out_fd, ctl_fd, notify_fd, pid;
    uint64_t base, size, page_size, npages, copied, faults, batch_pages;
    uint8_t *done;
    uint8_t *buf;
    pthread_t thread;
    int started, joined, stop, state; /* E_CREATED .. E_FAILED */
    char error[64];
    hist_t hist;
    pthread_mutex_t lock;
} Snapshot;

static int snap_copy(Snapshot *s, uint64_t p, uint64_t n)
{
    uint64_t len = n * s->page_size, addr = s->base + p * s->page_size;
    struct iovec local = {s->buf, len}, remote = {(void *)(uintptr_t)addr, len};
    if (process_vm_readv(s->pid, &local, 1, &remote, 1, 0) != (ssize_t)len)
        return -1;
    uint64_t put = 0;
    while (put < len) {
        ssize_t w = pwrite(s->out_fd, s->buf + put, len - put, (off_t)(p * s->page_size + put));
        if (w <= 0)
            return -1;
        put += (uint64_t)w;
    }
    struct uffdio_writeprotect wp = {.range = {addr, len}, .mode = 0}; /* lift, and wake */
    while (ioctl(s->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
        if (errno != EAGAIN)
            return -1;
    for (uint64_t i = 0; i < n; i++)
        s->done[p + i] = 1;
    s->copied += n;
    return 0;
}

static void snap_fail(Snapshot *s, const char *code)
{
    s->state = E_FAILED;
    snprintf(s->error, sizeof s->error, "%s", code);
}

static void snap_faults(Snapshot *s)
{
    struct uffd_msg msgs[UFFD_MSG_BATCH];
    for (;;) {
        ssize_t n = read(s->uffd, msgs, sizeof msgs);
        if (n <= 0)
            return;
        uint64_t t0 = now_ns();
        for (int i = 0; i < (int)(n / (ssize_t)sizeof(struct uffd_msg)); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address;
            if (addr < s->base || addr - s->base >= s->size)
                continue;
            uint64_t p = (addr - s->base) / s->page_size;
            s->faults++;
            if (!s->done[p] && snap_copy(s, p, 1) < 0) {
                snap_fail(s, "copy_failed");
                return;
            }
            if (s->done[p]) { /* already copied: just wake the writer */
                struct uffdio_range w = {s->base + p * s->page_size, s->page_size};
                ioctl(s->uffd, UFFDIO_WAKE, &w);
            }
            hist_add(&s->hist, now_ns() - t0);
        }
    }
}

static void *snap_thread(void *arg)
{
    Snapshot *s = arg;
    uint64_t cursor = 0;
    struct pollfd fds[2] = {{s->uffd, POLLIN, 0}, {s->ctl_fd, POLLIN, 0}};
    while (!s->stop && s->state == E_RUNNING && s->copied < s->npages) {
        poll(fds, 2, 0);
        pthread_mutex_lock(&s->lock);
        if (fds[0].revents & POLLIN)
            snap_faults(s);
        while (cursor < s->npages && s->done[cursor])
            cursor++;
        if (s->state == E_RUNNING && cursor < s->npages) {
            uint64_t n = 1;
            while (n < s->batch_pages && cursor + n < s->npages && !s->done[cursor + n])
                n++;
            if (snap_copy(s, cursor, n) < 0)
                snap_fail(s, errno == ESRCH ? "workload_exited" : "copy_failed");
        }
        pthread_mutex_unlock(&s->lock);
    }
    pthread_mutex_lock(&s->lock);
    if (s->state == E_RUNNING && s->copied >= s->npages) {
        struct uffdio_range rg = {s->base, s->size};
        ioctl(s->uffd, UFFDIO_UNREGISTER, &rg);
        snap_faults(s);
        fsync(s->out_fd);
        s->state = E_COMPLETED;
    }
    if (s->state == E_FAILED) { /* never leave the writer blocked: lift every protection */
        struct uffdio_writeprotect wp = {.range = {s->base, s->size}, .mode = 0};
        ioctl(s->uffd, UFFDIO_WRITEPROTECT, &wp);
        struct uffdio_range rg = {s->base, s->size};
        ioctl(s->uffd, UFFDIO_UNREGISTER, &rg);
    }
    close(s->uffd);
    s->uffd = -1;
    pthread_mutex_unlock(&s->lock);
    signal_fd(s->notify_fd);
    return NULL;
}

static int Snapshot_init(Snapshot *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"uffd", "base", "size", "page_size", "pid", "out_fd", "notify_fd",
                             "batch_bytes", NULL};
    int uffd, pid, out_fd, notify_fd;
    unsigned long long base, size, ps, batch = 1 << 20;
    if (s->buf) {
        PyErr_SetString(PyExc_RuntimeError, "Snapshot already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKKKiii|K", kwlist, &uffd, &base, &size, &ps,
                                     &pid, &out_fd, &notify_fd, &batch))
        return -1;
    if (ps == 0 || base % ps || size % ps || size == 0) {
        PyErr_SetString(PyExc_ValueError, "the region must be page aligned");
        return -1;
    }
    pthread_mutex_init(&s->lock, NULL);
    s->base = base, s->size = size, s->page_size = ps, s->npages = size / ps, s->pid = pid;
    s->batch_pages = batch / ps ? batch / ps : 1;
    s->done = calloc(s->npages, 1);
    s->buf = malloc(s->batch_pages * ps);
    s->uffd = fcntl(uffd, F_DUPFD_CLOEXEC, 3);
    s->out_fd = fcntl(out_fd, F_DUPFD_CLOEXEC, 3);
    s->notify_fd = notify_fd;
    s->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!s->done || !s->buf || s->uffd < 0 || s->out_fd < 0 || s->ctl_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    fcntl(s->uffd, F_SETFL, fcntl(s->uffd, F_GETFL) | O_NONBLOCK);
    s->state = E_CREATED;
    return 0;
}

/* Stop the workload, protect the whole region (the snapshot's instant), let it go on,
 * and start copying. */
static PyObject *Snapshot_start(Snapshot *s, PyObject *unused)
{
    if (s->state != E_CREATED)
        return PyErr_Format(PyExc_RuntimeError, "snapshot not in the created state");
    int err = 0;
    Py_BEGIN_ALLOW_THREADS if (kill(s->pid, SIGSTOP) == 0)
    {
        char path[64], st = 0;
        snprintf(path, sizeof path, "/proc/%d/stat", s->pid);
        for (int i = 0; i < 5000 && st != 'T'; i++) { /* wait until it is really stopped */
            FILE *f = fopen(path, "r");
            char line[512];
            if (!f || !fgets(line, sizeof line, f)) {
                if (f)
                    fclose(f);
                break;
            }
            fclose(f);
            char *rp = strrchr(line, ')');
            st = rp && rp[1] ? rp[2] : 0;
            if (st != 'T')
                usleep(200);
        }
        /* a process that never stopped (traced, uninterruptible) gives no instant: it is
         * never write-protected while it runs */
        struct uffdio_writeprotect wp = {.range = {s->base, s->size},
                                         .mode = UFFDIO_WRITEPROTECT_MODE_WP};
        if (st != 'T')
            err = EBUSY;
        else if (ioctl(s->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
            err = errno;
        kill(s->pid, SIGCONT);
    }
    else err = errno;
    Py_END_ALLOW_THREADS if (err)
    {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    s->state = E_RUNNING;
    if (pthread_create(&s->thread, NULL, snap_thread, s) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    s->started = 1;
    Py_RETURN_NONE;
}

static void snap_join(Snapshot *s)
{
    if (s->started && !s->joined) {
        s->stop = 1;
        signal_fd(s->ctl_fd);
        Py_BEGIN_ALLOW_THREADS pthread_join(s->thread, NULL);
        Py_END_ALLOW_THREADS s->joined = 1;
    }
}

static PyObject *Snapshot_close(Snapshot *s, PyObject *unused)
{
    snap_join(s);
    Py_RETURN_NONE;
}

static void Snapshot_dealloc(Snapshot *s)
{
    snap_join(s);
    int *fds[] = {&s->uffd, &s->out_fd, &s->ctl_fd};
    for (int i = 0; i < 3; i++)
        if (*fds[i] >= 0 && s->buf)
            close(*fds[i]);
    free(s->done);
    free(s->buf);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Snapshot_stats(Snapshot *s, PyObject *unused)
{
    pthread_mutex_lock(&s->lock);
    PyObject *d = Py_BuildValue("{sKsKsKsK}", "pages_total", (unsigned long long)s->npages,
                                "pages_copied", (unsigned long long)s->copied, "write_faults",
                                (unsigned long long)s->faults, "fault_max_ns",
                                (unsigned long long)s->hist.max_ns);
    pthread_mutex_unlock(&s->lock);
    return d;
}

static PyObject *Snapshot_get_state(Snapshot *s, void *c) { return PyUnicode_FromString(state_names[s->state]); }
static PyObject *Snapshot_get_error(Snapshot *s, void *c)
{
    if (!s->error[0])
        Py_RETURN_NONE;
    return PyUnicode_FromString(s->error);
}

static PyMethodDef Snapshot_methods[] = {
    {"start", (PyCFunction)Snapshot_start, METH_NOARGS, "Protect the region and start copying."},
    {"stats", (PyCFunction)Snapshot_stats, METH_NOARGS, "Counters."},
    {"close", (PyCFunction)Snapshot_close, METH_NOARGS, "Stop the copying thread."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Snapshot_getset[] = {
    {"state", (getter)Snapshot_get_state, NULL, "created, running, completed or failed", NULL},
    {"error", (getter)Snapshot_get_error, NULL, "Failure code or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject SnapshotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pagewire._uffd.Snapshot",
    .tp_basicsize = sizeof(Snapshot),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A live snapshot of a write-protected region to a file.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Snapshot_init,
    .tp_dealloc = (destructor)Snapshot_dealloc,
    .tp_methods = Snapshot_methods,
    .tp_getset = Snapshot_getset,
};

/* ---- module functions -------------------------------------------------- */

static int open_uffd(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -1;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    close(dev);
    return fd;
}

static PyObject *mod_uffd_create(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"features", "nonblock", NULL};
    unsigned long long features;
    int nonblock = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|p", kwlist, &features, &nonblock))
        return NULL;
    int fd = open_uffd(O_CLOEXEC | (nonblock ? O_NONBLOCK : 0));
    if (fd < 0)
        return PyErr_Format(UffdError, "userfaultfd unavailable: %s", strerror(errno));
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int err = errno;
        close(fd);
        return PyErr_Format(UffdError, "UFFDIO_API features 0x%llx refused: %s", features,
                            strerror(err));
    }
    return PyLong_FromLong(fd);
}

static PyObject *mod_uffd_features(PyObject *m, PyObject *arg)
{
    int fd = PyLong_AsLong(arg);
    if (fd < 0 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(read_fdinfo_features(fd));
}

static PyObject *mod_uffd_register(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "addr", "size", "wp", "missing", NULL};
    int fd, wp = 0, missing = 1;
    unsigned long long addr, size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKK|pp", kwlist, &fd, &addr, &size, &wp,
                                     &missing))
        return NULL;
    struct uffdio_register reg = {.range = {addr, size},
                                  .mode = (missing ? UFFDIO_REGISTER_MODE_MISSING : 0) |
                                          (wp ? UFFDIO_REGISTER_MODE_WP : 0)};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return PyErr_Format(UffdError, "UFFDIO_REGISTER: %s", strerror(errno));
    Py_RETURN_NONE;
}

static PyObject *mod_uffd_unregister(PyObject *m, PyObject *args)
{
    int fd;
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &addr, &size))
        return NULL;
    struct uffdio_range rg = {addr, size};
    if (ioctl(fd, UFFDIO_UNREGISTER, &rg) < 0)
        return PyErr_Format(UffdError, "UFFDIO_UNREGISTER: %s", strerror(errno));
    Py_RETURN_NONE;
}

static PyObject *mod_uffd_poison(PyObject *m, PyObject *args)
{
    int fd;
    unsigned long long addr, size, page = (unsigned long long)sysconf(_SC_PAGESIZE);
    if (!PyArg_ParseTuple(args, "iKK|K", &fd, &addr, &size, &page))
        return NULL;
    if (page == 0 || (page & (page - 1)))
        return PyErr_Format(PyExc_ValueError, "page size must be a power of two");
    int64_t n;
    Py_BEGIN_ALLOW_THREADS n = poison_range(fd, addr, size, page);
    Py_END_ALLOW_THREADS if (n < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong(n);
}

static PyObject *mod_uffd_copy(PyObject *m, PyObject *args)
{
    int fd, rc;
    unsigned long long addr;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iKy*", &fd, &addr, &b))
        return NULL;
    struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)b.buf, .len = (uint64_t)b.len};
    Py_BEGIN_ALLOW_THREADS rc = ioctl(fd, UFFDIO_COPY, &c);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    if (rc < 0 && c.copy <= 0)
        return PyErr_Format(UffdError, "UFFDIO_COPY: %s", strerror(errno));
    return PyLong_FromLongLong(c.copy);
}

/* Read another process's memory (process_vm_readv), GIL released. */
static PyObject *mod_process_read(PyObject *m, PyObject *args)
{
    int pid;
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "iKK", &pid, &addr, &size))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    uint64_t got = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS while (got < size)
    {
        struct iovec local = {dst + got, size - got};
        struct iovec remote = {(void *)(uintptr_t)(addr + got), size - got};
        ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (n <= 0) {
            err = n < 0 ? errno : EFAULT;
            break;
        }
        got += (uint64_t)n;
    }
    Py_END_ALLOW_THREADS if (err)
    {
        Py_DECREF(out);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return out;
}

static PyObject *mod_pidfd_getfd(PyObject *m, PyObject *args)
{
    int pidfd, fd;
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &fd))
        return NULL;
    int got = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(got);
}

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

static PyObject *mod_mmap_anon(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"size", "hugetlb", "addr", NULL};
    unsigned long long size, addr = 0;
    int huge = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|pK", kwlist, &size, &huge, &addr))
        return NULL;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (huge)
        flags |= MAP_HUGETLB | MAP_HUGE_2MB;
    if (addr)
        flags |= MAP_FIXED_NOREPLACE; /* the same address as on the source, or an error */
    void *p = mmap((void *)(uintptr_t)addr, size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLongLong((uintptr_t)p);
}

static PyObject *mod_munmap(PyObject *m, PyObject *args)
{
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "KK", &addr, &size))
        return NULL;
    if (munmap((void *)(uintptr_t)addr, size) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *mod_madvise(PyObject *m, PyObject *args)
{
    unsigned long long addr, size;
    int advice, rc;
    if (!PyArg_ParseTuple(args, "KKi", &addr, &size, &advice))
        return NULL;
    Py_BEGIN_ALLOW_THREADS rc = madvise((void *)(uintptr_t)addr, size, advice);
    Py_END_ALLOW_THREADS if (rc < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *mod_read_memory(PyObject *m, PyObject *args)
{
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "KK", &addr, &size))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS memcpy(dst, (void *)(uintptr_t)addr, size);
    Py_END_ALLOW_THREADS return out;
}

static PyObject *mod_write_memory(PyObject *m, PyObject *args)
{
    unsigned long long addr;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "Ky*", &addr, &b))
        return NULL;
    Py_BEGIN_ALLOW_THREADS memcpy((void *)(uintptr_t)addr, b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *mod_touch_pages(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"addr", "page_size", "pages", "write", NULL};
    unsigned long long addr, ps;
    PyObject *pages;
    int write_ = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKO|p", kwlist, &addr, &ps, &pages, &write_))
        return NULL;
    PyObject *fast = PySequence_Fast(pages, "pages must be a sequence");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    uint64_t *idx = malloc((size_t)(n ? n : 1) * sizeof(uint64_t) * 2);
    if (!idx) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    uint64_t *lat = idx + n;
    for (Py_ssize_t i = 0; i < n; i++)
        idx[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
    Py_DECREF(fast);
    if (PyErr_Occurred()) {
        free(idx);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++)
    {
        volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(addr + idx[i] * ps);
        uint64_t t0 = now_ns();
        if (write_)
            *p = *p;
        else
            (void)*p;
        lat[i] = now_ns() - t0;
    }
    Py_END_ALLOW_THREADS PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++)
        PyList_SET_ITEM(out, i, PyLong_FromUnsignedLongLong(lat[i]));
    free(idx);
    return out;
}

static int is_zero(const uint8_t *p, size_t n)
{
    const uint64_t *q = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++)
        if (q[i])
            return 0;
    return 1;
}

static PyObject *mod_zero_map(PyObject *m, PyObject *args)
{
    int fd;
    unsigned long long size, ps;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &size, &ps))
        return NULL;
    if (ps == 0 || ps % 8 || size % ps)
        return PyErr_Format(PyExc_ValueError, "size must be a multiple of the page size");
    uint64_t npages = size / ps;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)npages);
    if (!out)
        return NULL;
    uint8_t *z = (uint8_t *)PyBytes_AS_STRING(out);
    size_t bufsz = 1 << 20;
    if (bufsz < ps)
        bufsz = ps;
    uint8_t *buf = malloc(bufsz);
    int err = 0;
    Py_BEGIN_ALLOW_THREADS memset(z, 1, npages);
    uint64_t off = 0;
    while (off < size && !err) {
        off_t data = lseek(fd, (off_t)off, SEEK_DATA);
        if (data < 0) {
            if (errno != ENXIO)
                err = errno;
            break; /* the rest is a hole */
        }
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0 || (uint64_t)hole > size)
            hole = (off_t)size;
        uint64_t start = (uint64_t)data / ps * ps;
        for (uint64_t pos = start; pos < (uint64_t)hole && !err;) {
            size_t len = bufsz;
            if (pos + len > size)
                len = size - pos;
            ssize_t got = pread(fd, buf, len, (off_t)pos);
            if (got <= 0) {
                err = got < 0 ? errno : EIO;
                break;
            }
            for (size_t k = 0; k + ps <= (size_t)got; k += ps)
                z[(pos + k) / ps] = (uint8_t)is_zero(buf + k, ps);
            pos += (uint64_t)got / ps * ps;
        }
        off = ((uint64_t)hole + ps - 1) / ps * ps;
    }
    Py_END_ALLOW_THREADS free(buf);
    if (err) {
        Py_DECREF(out);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return out;
}

static PyObject *mod_memory_equals_file(PyObject *m, PyObject *args)
{
    unsigned long long addr, size, off;
    int fd;
    if (!PyArg_ParseTuple(args, "KKiK", &addr, &size, &fd, &off))
        return NULL;
    size_t bufsz = 1 << 20;
    uint8_t *buf = malloc(bufsz);
    long long diff = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS for (uint64_t pos = 0; pos < size && diff < 0;)
    {
        size_t len = size - pos < bufsz ? size - pos : bufsz;
        ssize_t got = pread(fd, buf, len, (off_t)(off + pos));
        if (got <= 0) {
            err = got < 0 ? errno : EIO;
            break;
        }
        const uint8_t *mem = (const uint8_t *)(uintptr_t)(addr + pos);
        if (memcmp(mem, buf, (size_t)got) != 0)
            for (ssize_t k = 0; k < got; k++)
                if (mem[k] != buf[k]) {
                    diff = (long long)(pos + (uint64_t)k);
                    break;
                }
        pos += (uint64_t)got;
    }
    Py_END_ALLOW_THREADS free(buf);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(diff);
}

static PyObject *mod_sha256(PyObject *m, PyObject *arg)
{
    Py_buffer b;
    uint8_t d[32];
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS sha256(b.buf, (size_t)b.len, d);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)d, 32);
}

static PyObject *mod_xxh128(PyObject *m, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    uint8_t out[16];
    Py_BEGIN_ALLOW_THREADS fast_digest(b.buf, (size_t)b.len, out);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *mod_zstd_compress(PyObject *m, PyObject *args)
{
    Py_buffer b;
    int level = 1;
    if (!PyArg_ParseTuple(args, "y*|i", &b, &level))
        return NULL;
    if (!zstd_compress_fn) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_RuntimeError, "libzstd is not available");
    }
    size_t cap = (size_t)b.len + (size_t)b.len / 128 + 1024;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
    size_t n = 0;
    if (out) {
        char *dst = PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS n = zstd_compress_fn(dst, cap, b.buf, (size_t)b.len, level);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    if (out && (zstd_is_error_fn(n) || _PyBytes_Resize(&out, (Py_ssize_t)n) < 0)) {
        Py_XDECREF(out);
        return PyErr_Format(PyExc_ValueError, "zstd compression failed");
    }
    return out;
}

static PyObject *mod_zstd_decompress(PyObject *m, PyObject *args)
{
    Py_buffer b;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*n", &b, &size))
        return NULL;
    if (!zstd_compress_fn || size < 0 || size > (1 << 30)) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "cannot decompress (libzstd missing or bad size)");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    int64_t n = -1;
    if (out) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS n = zstd_unpack(dst, (size_t)size, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    if (out && n != size) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "corrupt zstd data or wrong size");
    }
    return out;
}

static PyObject *mod_zstd_available(PyObject *m, PyObject *unused)
{
    return PyBool_FromLong(zstd_compress_fn != NULL);
}

static PyMethodDef module_methods[] = {
    {"zstd_compress", mod_zstd_compress, METH_VARARGS, "zstd-compress bytes (GIL released)."},
    {"zstd_decompress", mod_zstd_decompress, METH_VARARGS,
     "zstd-decompress to exactly size bytes (GIL released)."},
    {"zstd_available", mod_zstd_available, METH_NOARGS, "Whether libzstd could be loaded."},
    {"sha256", mod_sha256, METH_O, "SHA-256 as the native channel computes it."},
    {"xxh128", mod_xxh128, METH_O, "XXH3-128 (canonical bytes): the per-chunk fast digest."},
    {"uffd_create", (PyCFunction)(void (*)(void))mod_uffd_create, METH_VARARGS | METH_KEYWORDS,
     "Create a userfaultfd with the given features."},
    {"uffd_features", mod_uffd_features, METH_O, "Negotiated features of a uffd (fdinfo)."},
    {"uffd_register", (PyCFunction)(void (*)(void))mod_uffd_register,
     METH_VARARGS | METH_KEYWORDS, "Register a range in MISSING (and WP) mode."},
    {"uffd_unregister", mod_uffd_unregister, METH_VARARGS, "Unregister a range."},
    {"uffd_poison", mod_uffd_poison, METH_VARARGS,
     "UFFDIO_POISON a range page by page, skipping present pages; pages poisoned."},
    {"pidfd_getfd", mod_pidfd_getfd, METH_VARARGS, "Copy another process's fd (pidfd_getfd)."},
    {"process_read", mod_process_read, METH_VARARGS,
     "Read another process's memory (process_vm_readv)."},
    {"uffd_copy", mod_uffd_copy, METH_VARARGS, "UFFDIO_COPY bytes to an address; bytes copied."},
    {"mmap_anon", (PyCFunction)(void (*)(void))mod_mmap_anon, METH_VARARGS | METH_KEYWORDS,
     "Map an anonymous private region; returns its address."},
    {"munmap", mod_munmap, METH_VARARGS, "Unmap."},
    {"madvise", mod_madvise, METH_VARARGS, "madvise (GIL released)."},
    {"read_memory", mod_read_memory, METH_VARARGS, "Copy memory out (GIL released)."},
    {"write_memory", mod_write_memory, METH_VARARGS, "Copy bytes in (GIL released)."},
    {"touch_pages", (PyCFunction)(void (*)(void))mod_touch_pages, METH_VARARGS | METH_KEYWORDS,
     "Touch pages in order; ns per touch (GIL released)."},
    {"zero_map", mod_zero_map, METH_VARARGS, "One byte per page: 1 if all zero."},
    {"memory_equals_file", mod_memory_equals_file, METH_VARARGS,
     "-1 if memory equals the file range, else the first differing offset."},
    {NULL, NULL, 0, NULL}};

#ifdef PAGEWIRE_TEST_HOOKS
#define MODULE_NAME "_uffd_hooks" /* the test build: tests/native_hooks.py */
#define MODULE_INIT PyInit__uffd_hooks
#else
#define MODULE_NAME "pagewire._uffd"
#define MODULE_INIT PyInit__uffd
#endif
static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, MODULE_NAME,
                                       "pagewire's native userfaultfd engine.", -1,
                                       module_methods, NULL, NULL, NULL, NULL};

static uint64_t probe_features(void)
{
    int fd = open_uffd(O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return 0;
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    uint64_t f = ioctl(fd, UFFDIO_API, &api) == 0 ? api.features : 0;
    close(fd);
    return f;
}

PyMODINIT_FUNC MODULE_INIT(void)
{
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&DataServerType) < 0 ||
        PyType_Ready(&ChunkCacheType) < 0 || PyType_Ready(&SnapshotType) < 0)
        return NULL;
    load_libzstd();
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    UffdError = PyErr_NewExceptionWithDoc("pagewire._uffd.UffdError",
                                          "A userfaultfd operation failed.", PyExc_OSError, NULL);
    Py_INCREF(&EngineType);
    Py_INCREF(&DataServerType);
    Py_INCREF(&ChunkCacheType);
    Py_INCREF(&SnapshotType);
    if (PyModule_AddObject(m, "Snapshot", (PyObject *)&SnapshotType) < 0)
        return NULL;
    if (PyModule_AddObject(m, "DataServer", (PyObject *)&DataServerType) < 0 ||
        PyModule_AddObject(m, "ChunkCache", (PyObject *)&ChunkCacheType) < 0)
        return NULL;
    if (!UffdError || PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "UffdError", UffdError) < 0)
        return NULL;
    struct {
        const char *name;
        long long value;
    } consts[] = {
        {"MISSING", ST_MISSING},
        {"REQUESTED", ST_REQUESTED},
        {"PRESENT", ST_PRESENT},
        {"CACHE_ABSENT", CACHE_ABSENT},
        {"CACHE_READY", CACHE_READY},
        {"CACHE_PENDING", CACHE_PENDING},
        {"ZERO", ST_ZERO},
        {"REMOVED", ST_REMOVED},
        {"SRC_ZERO", SRC_ZERO},
        {"FAULT", KIND_FAULT},
        {"PREFETCH", KIND_PREFETCH},
        {"BACKGROUND", KIND_BACKGROUND},
        {"RES_LOCAL", RES_LOCAL},
        {"RES_REMOTE", RES_REMOTE},
        {"RES_ZERO", RES_ZERO},
        {"HIST_BUCKETS", HIST_BUCKETS},
        {"FEATURE_EVENT_FORK", UFFD_FEATURE_EVENT_FORK},
        {"FEATURE_EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP},
        {"FEATURE_EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE},
        {"FEATURE_MISSING_HUGETLBFS", UFFD_FEATURE_MISSING_HUGETLBFS},
        {"FEATURE_MISSING_SHMEM", UFFD_FEATURE_MISSING_SHMEM},
        {"FEATURE_EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP},
        {"FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS},
        {"FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID},
        {"FEATURE_EXACT_ADDRESS", UFFD_FEATURE_EXACT_ADDRESS},
        {"FEATURE_POISON", UFFD_FEATURE_POISON},
        {"FEATURE_WP", UFFD_FEATURE_PAGEFAULT_FLAG_WP},
        {"FEATURE_WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            return NULL;
    PyObject *bounds = PyTuple_New(HIST_BUCKETS);
    for (int i = 0; bounds && i < HIST_BUCKETS; i++)
        PyTuple_SET_ITEM(bounds, i, PyLong_FromUnsignedLongLong(hist_upper(i)));
    if (!bounds || PyModule_AddObject(m, "HIST_BOUNDS_NS", bounds) < 0)
        return NULL;
    if (PyModule_AddObject(m, "API_FEATURES_SUPPORTED",
                           PyLong_FromUnsignedLongLong(probe_features())) < 0)
        return NULL;
    return m;
}
