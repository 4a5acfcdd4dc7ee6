#ifndef PAGEWIRE_UFFD_H
#define PAGEWIRE_UFFD_H
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
#include <linux/sockios.h>
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

static inline int hist_index(uint64_t ns)
{
    if (ns < (1ULL << HIST_MIN_SHIFT))
        return 0;
    int e = 63 - __builtin_clzll(ns);
    if (e >= HIST_MAX_SHIFT)
        return HIST_BUCKETS - 1;
    int sub = (int)((ns >> (e - 2)) & 3);
    return 1 + (e - HIST_MIN_SHIFT) * 4 + sub;
}

static inline uint64_t hist_upper(int i)
{
    if (i == 0)
        return 1ULL << HIST_MIN_SHIFT;
    int e = (i - 1) / 4 + HIST_MIN_SHIFT, sub = (i - 1) % 4;
    return (uint64_t)(4 + sub + 1) << (e - 2);
}

static inline void hist_add(hist_t *h, uint64_t ns)
{
    h->counts[hist_index(ns)]++;
    h->sum_ns += ns;
    h->n++;
    if (ns > h->max_ns)
        h->max_ns = ns;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- native data channel: digests and wire ---------------------------------
 *
 * Between agents, page data may flow over a native TCP channel negotiated and authorised
 * over gRPC: a 16-byte token per session. Under mTLS each connection is TLS 1.3 with the
 * agents' certificates (link.c). Per session one urgent connection and up to BULK_CONNS
 * bulk ones, so a demand fault never waits behind bulk data, and before attach one stage
 * connection that fetches a recorded working set (served as bulk; chan_stage.c).
 *
 *   hello    client: "PWDATA01" token[16] u32 kind u32 0    server: "PWOK" u32 status
 *   request  u32 count (1..MAX_REQ) u32 0, count x u64 chunk index
 *   answer   per index: u64 index u32 data_len u32 status, then data_len bytes: the
 *            chunk's non-zero pages in order (zero pages never cross the network); on a
 *            bulk connection, CHAN_SKIPPED with no data for a chunk the session's urgent
 *            connection already sent
 */

#include <dlfcn.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
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
#define CHAN_SKIPPED 5 /* bulk answer without data: the urgent connection sent the chunk */
/* hello kinds: what a grant admits one (urgent), BULK_CONNS (bulk) and one (stage) of */
#define CHAN_KIND_URGENT 1
#define CHAN_KIND_BULK 2
#define CHAN_KIND_STAGE 3 /* a working set fetched before attach (chan_stage.c) */
#define CHAN_ZSTD (1u << 16) /* answer flag: data is zstd; hello kind flag: please compress */

/* zstd, loaded at run time like libcrypto: wire compression is optional */
typedef size_t (*zstd_compress_t)(void *, size_t, const void *, size_t, int);
typedef size_t (*zstd_decompress_t)(void *, size_t, const void *, size_t);
typedef unsigned (*zstd_is_error_t)(size_t);

typedef struct {
    uint64_t index;
    uint32_t data_len, status;
} chan_answer_t;

/* A channel connection: plain TCP, or TLS 1.3 when the agents speak mTLS (link.c). */
typedef struct {
    int fd;
    SSL *ssl;             /* NULL: plain TCP */
    pthread_mutex_t lock; /* TLS: one SSL call at a time; waits happen outside it */
    int timeout_ms;       /* TLS waits (plain sockets keep their SO_RCVTIMEO) */
} link_t;

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
    vec_t retry;    /* fault_t: read, met -EAGAIN, decided again next turn */
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

/* ---- scheduling (sched.c) ---------------------------------------------- */

typedef struct {
    pid_t tid;
    int realtime;
    uint64_t window_ns, cpu_ns;
} rt_budget_t;
#define RT_WINDOW_NS (250ULL * 1000000ULL)
#define RT_BUDGET_PCT 80

/* ---- installs --------------------------------------------------------- */

enum { INS_OK = 0, INS_AGAIN = 1, INS_GONE = 2, INS_ERR = 3 };

#define UFFD_MSG_BATCH 64
#define UFFD_QUIET_MS 20 /* no event for this long after unregistering: none is coming */
#define RETRY_TICK_NS 50000L /* a fault that met -EAGAIN is decided again this much later */

typedef struct {
    uint64_t addr, t0;
} fault_t;

/* ---- native data channel: the destination's side, inside the engine -------- */

/* Bulk connections per session (when the host has the cores): receiving, verifying and
 * installing on one run alongside the other's. A grant admits this many. */
#define BULK_CONNS 2

/* Faults waiting for bulk chunks: at most this many at once (more are asked for urgently
 * at once), and only while their connection moves: one that has received no chunk for
 * BULK_WAIT_NS gets the chunk asked for urgently (16 sessions, 64 workload threads on 2
 * vCPUs left a bulk receiver unscheduled for up to 100 ms). While a working set is being
 * asked for, a connection with nothing in its socket buffer is waited for up to
 * BULK_WAIT_MAX_NS: the burst's answers come a few ms apart at times, and asking for them
 * urgently meanwhile slows the burst the workload is about to touch. */
#define BULK_WAIT_SLOTS 16
#define BULK_WAIT_NS 2000000ULL
#define BULK_WAIT_MAX_NS 20000000ULL

struct bulk_conn {
    Engine *e;
    link_t link;
    pthread_t tid;
    int started;
    uint32_t asked_seq, done_seq; /* chunks asked for and received on it, in order */
};

struct chan {
    link_t urgent;
    struct bulk_conn bulk[BULK_CONNS];
    int nbulk; /* bulk connections open: 0 without background fill or working set */
    int up, background, compress;
    uint64_t chunk_size, export_size, export_ps, nchunks;
    uint8_t *zmap, *digests, *asked;
    uint8_t *fast; /* XXH3-128 per chunk from Describe, or NULL: verify with SHA-256 */
    uint32_t outstanding;
    uint64_t last_answer_ns;
    pthread_t urx;
    int urx_started;
    uint64_t bytes_received, digest_failures, chunks_urgent, chunks_bulk, bytes_raw;
    uint64_t chunks_cached, chunks_skipped;
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
    uint32_t *bulk_seq;    /* chunk k's place in its bulk connection's order */
    uint8_t *bulk_conn_of; /* which bulk connection chunk k was asked for on */
    uint64_t chunks_waited; /* faults that waited for a chunk already on its way */
    /* chunks faults wait for on a bulk connection, since when, and how far that
     * connection had got then (a chunk received since restarts the clock) */
    uint64_t bulk_waits[BULK_WAIT_SLOTS], bulk_wait_since[BULK_WAIT_SLOTS];
    uint32_t bulk_wait_seq[BULK_WAIT_SLOTS];
    uint32_t nbulk_waits;
    uint64_t bulk_waits_expired; /* of those, asked for urgently: the connection stalled */
    /* bulk receivers install one at a time: the one waiting sleeps here instead of
     * spinning in the kernel on the priority-inheriting engine lock, which on two vCPUs
     * took the CPU the other receiver and the source needed */
    pthread_mutex_t install_lock;
    /* huge pages (chan_gather.c): chunks per page, and per page the chunks received so
     * far (gather, gather_n) until the page is whole; gathered[k]: chunk k is held there */
    uint64_t unit;
    uint8_t **gather;
    uint32_t *gather_n;
    uint8_t *gather_retries; /* per page: asked again after an install fell short */
    uint8_t *gathered;
};
#define MAX_UNIT 64      /* chunks per page the channel gathers (4 MiB of 64 KiB chunks) */
#define GATHER_RETRIES 3

/* c->asked[k]: the chunk is on its way, so a fault there waits for it */
enum { ASK_NONE = 0, ASK_URGENT = 1, ASK_BULK = 2 };
/* A fault waits for a chunk already asked for on a bulk connection only if at most this
 * many chunks are ahead of it there; deeper in the queue it is asked for urgently and the
 * source skips it on the bulk connection (CHAN_SKIPPED), so it still crosses once. */
#define BULK_WAIT 8

#define CHAN_STALL_NS (3ULL * 1000000000ULL)

/* The next chunks of the bulk pass that still hold a missing data page and are not on
 * their way already; marks them ASK_BULK. The cursor only advances (each call looks at a
 * bounded stretch under the lock), so a pass is linear in the image. */
#define BULK_SCAN 1024

#define BULK_DEPTH_BYTES (512u << 10) /* requested ahead: bounds what a fault may wait behind */
#define BULK_RUN_BYTES (1u << 20)   /* received before one install */
#define INSTALL_PIECE 4              /* chunks installed per hold of the engine lock */
#define WS_DEPTH 64 /* chunks asked ahead per bulk connection while a working set replays */

typedef struct {
    uint64_t *fifo; /* asked for, in order */
    size_t head, count, cap, depth;
    uint64_t *run; /* received, not yet installed: indexes of buf's chunks */
    size_t nrun, run_cap;
    uint8_t *buf, *stage;
    struct bulk_conn *conn;
    link_t *link;
} bulk_t;

/* ---- native data channel: the source's server ---------------------------- */

typedef struct {
    int fd, stale, removed, refs; /* refs: connections serving it; freed at 0 once removed */
    uint64_t size, page_size, chunk_size, npages, nchunks;
    uint8_t *zero_map; /* one byte per page */
    dev_t dev;
    ino_t ino;
    struct timespec mtime;
} dexport_t;

/* What one session's connections share on the source: the chunks its urgent connection
 * has served, which its bulk connections then skip (the destination asked for them
 * urgently because its fault would otherwise wait behind the bulk queue). Freed when the
 * grant and the last connection let go of it. */
typedef struct {
    uint8_t *served; /* one byte per chunk: set by an urgent send, cleared by one bulk skip */
    uint64_t nchunks;
    int refs;
} chan_session_t;

/* A grant serves one urgent, BULK_CONNS bulk and one stage connection, until it expires or
 * the first two kinds are used up; a refused hello revokes it. Grants are chained in a
 * hash table on their (random) token, so taking or revoking one is O(1). */
typedef struct grant {
    uint8_t token[16];
    int export_id;
    chan_session_t *session;
    int left[4]; /* connections it still admits, by kind: [1] urgent, [2] bulk, [3] stage */
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
    chan_session_t *session;
    int kind;
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
    uint64_t bytes_sent, chunks_sent, chunks_skipped, refused;
    /* limits (0: the default) and what they refused */
    int max_conns, per_peer, pending_per_peer, hello_ms;
    uint64_t refused_busy, refused_token, hello_timeouts, evicted;
    int closing[CLOSING_MAX]; /* refused connections, closed once their reply was read */
    uint64_t closing_ns[CLOSING_MAX];
    int nclosing;
    SSL_CTX *tls;  /* under mTLS: every connection is TLS 1.3, the client's cert checked */
    char **allow;  /* --peer-allow patterns a client certificate's SAN must match */
    int nallow;
    uint64_t refused_tls;
} DataServer;

#define LIMIT_OR(v, d) ((v) > 0 ? (v) : (d))
#define SRV_MAX_CONNS(s) (LIMIT_OR((s)->max_conns, 256) > MAX_CONNS ? MAX_CONNS : LIMIT_OR((s)->max_conns, 256))

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

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

/* ---- shared between files ---- */
extern zstd_compress_t zstd_compress_fn;
extern zstd_is_error_t zstd_is_error_fn;
extern PyTypeObject ChunkCacheType;
extern const char *state_names[];
extern PyObject *UffdError;
extern PyTypeObject EngineType;
extern PyTypeObject DataServerType;
extern PyTypeObject SnapshotType;
void sha256(const uint8_t *data, size_t len, uint8_t out[32]);
void fast_digest(const uint8_t *data, size_t len, uint8_t out[16]);
void load_libzstd(void);
int64_t zstd_pack(uint8_t *dst, size_t cap, const uint8_t *src, size_t len);
int64_t zstd_unpack(uint8_t *dst, size_t cap, const uint8_t *src, size_t len);
int read_full(int fd, void *buf, size_t len);
int write_full(int fd, const void *buf, size_t len);
int send_full(int fd, const void *buf, size_t len, int flags);
int cache_take(ChunkCache *c, const uint8_t d[32], uint8_t *dst, uint32_t len, const void *owner, int claim);
void cache_fill(ChunkCache *c, const uint8_t d[32], const uint8_t *data, uint32_t len);
void cache_release(ChunkCache *c, const void *owner);
int vec_push(vec_t *v, const void *item);
void signal_fd(int fd);
void set_state(Engine *e, region_t *r, uint64_t p, int st);
int page_done(uint8_t s);
int all_done(Engine *e);
void engine_fail_locked(Engine *e, const char *code);
int find_region(Engine *e, uint64_t addr);
int install_run(Engine *e, region_t *r, uint64_t p, uint64_t n, const uint8_t *src, int new_state, uint64_t *done);
int page_is_zero_src(region_t *r, uint64_t p);
void queue_request(Engine *e, region_t *r, uint64_t p);
void record_offset(Engine *e, uint64_t off);
void settle_pending(Engine *e);
void close_uffd(Engine *e);
int64_t poison_range(int uffd, uint64_t addr, uint64_t len, uint64_t page);
int poison_missing(Engine *e);
void *fault_thread(void *arg);
uint64_t read_fdinfo_features(int fd);
uint64_t install_image_range(Engine *e, uint64_t off, const uint8_t *data, uint64_t len, int kind, int wait);
int chan_request_locked(Engine *e, region_t *r, uint64_t p);
int chunk_holds(Engine *e, struct chan *c, uint64_t k, unsigned states);
uint64_t chunk_len_of(struct chan *c, uint64_t k);
void chan_down_locked(Engine *e, const char *reason);
int chan_unit_chunks(Engine *e, uint64_t chunk_size);
int chan_gather_init(struct chan *c, uint64_t unit);
void chan_gather_free(struct chan *c);
int chan_request_unit_locked(Engine *e, struct chan *c, uint64_t chunk);
int chan_wait_on_bulk_locked(struct chan *c, uint64_t k);
void chan_gather_locked(Engine *e, uint64_t k, const uint8_t *data, int kind);
void chan_flush_urgent(Engine *e);
int chan_bulk_waits_locked(Engine *e);
void bulk_priority(void);
rt_budget_t urgent_priority(int realtime);
void rt_budget_check(rt_budget_t *b);
void chan_stop(Engine *e);
void chan_free(Engine *e);
void chan_start_threads(Engine *e);
PyObject *Engine_attach_channel(Engine *e, PyObject *args, PyObject *kw);
int chan_desc_ok(uint64_t cs, uint64_t size, uint64_t eps, const Py_buffer *zm,
                 const Py_buffer *dg, const Py_buffer *fd);
int chan_connect(link_t *l, const char *host, int port, const uint8_t token[16], uint32_t kind,
                 SSL_CTX *tls, char *why, size_t n);
int64_t chan_receive(struct chan *c, link_t *l, uint8_t *buf, uint8_t *stage,
                     uint64_t *len_out, const char **why);
PyObject *mod_stage_chunks(PyObject *self, PyObject *args, PyObject *kw); /* chan_stage.c */
PyObject *Engine_share_cache(Engine *e, PyObject *arg);
PyObject *Engine_get_channel(Engine *e, void *unused);

SSL_CTX *tls_context(int server, const char *cert, const char *key, const char *ca, char *err,
                     size_t n);
void link_plain(link_t *l, int fd);
int link_tls(link_t *l, SSL_CTX *ctx, int server, const char *host, int timeout_ms);
void link_tls_reason(link_t *l, char *out, size_t n);
int link_read(link_t *l, void *buf, size_t len);
int link_write(link_t *l, const void *buf, size_t len);
int link_wait(link_t *l, int timeout_ms);
void link_release(link_t *l);
void link_close(link_t *l);
int link_peer_allowed(link_t *l, char *const *patterns, int npatterns);

#endif
