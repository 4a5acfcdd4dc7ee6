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
#include <sys/stat.h>
#include <sys/syscall.h>
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

typedef struct {
    PyObject_HEAD
    int uffd, ctl_fd, notify_fd, source_fd, pidfd;
    uint64_t features, source_size, sys_page;
    int nregions;
    region_t *regions;
    int background, window_pages;
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
static int resolve_local(Engine *e, region_t *r, uint64_t p)
{
    uint64_t w = (uint64_t)e->window_pages;
    uint64_t max_pages = e->buf_size / r->page_size;
    if (w > max_pages)
        w = max_pages;
    if (w < 1)
        w = 1;
    uint64_t lo = p - p % w, hi = lo + w;
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

/* Decide one fault from current state. Returns 1 if resolved, 0 if it must
 * be retried after events are drained, -1 if it now waits for Python. */
static int decide_fault(Engine *e, int ri, uint64_t p, uint64_t t0)
{
    region_t *r = &e->regions[ri];
    int st = r->state[p] & ST_MASK;
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
    if (e->source_fd >= 0) {
        rc = resolve_local(e, r, p);
        if (rc == INS_AGAIN)
            return 0;
        record_fault(e, RES_LOCAL, t0);
        return 1;
    }
    set_state(e, r, p, ST_REQUESTED);
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

#define MSG_BATCH 64

typedef struct {
    uint64_t addr, t0;
} fault_t;

static void poison_page_or_fail(Engine *e, uint64_t addr)
{
    e->faults_unknown++;
    if (e->features & UFFD_FEATURE_POISON) {
        struct uffdio_poison po = {.range = {addr & ~(e->sys_page - 1), e->sys_page}, .mode = 0};
        ioctl(e->uffd, UFFDIO_POISON, &po);
    } else {
        engine_fail_locked(e, "fault_outside_regions");
    }
}

/* Read every queued message; apply events; decide faults, deferring any that
 * hit -EAGAIN until the events behind them have been drained. */
static void handle_messages(Engine *e)
{
    fault_t *deferred = NULL;
    size_t ndef = 0, capdef = 0;
    for (int rounds = 0; rounds < 1000 && e->state == E_RUNNING; rounds++) {
        struct uffd_msg msgs[MSG_BATCH];
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
                deferred = realloc(deferred, capdef * sizeof *deferred);
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
        if (nmsg < MSG_BATCH && ndef == 0)
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
    struct uffd_msg msgs[MSG_BATCH];
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

static int poison_missing(Engine *e)
{
    if (!(e->features & UFFD_FEATURE_POISON))
        return -1;
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
            for (int tries = 0; tries < 100; tries++) {
                struct uffdio_poison po = {
                    .range = {r->base + s * r->page_size, (p - s) * r->page_size}, .mode = 0};
                if (ioctl(e->uffd, UFFDIO_POISON, &po) == 0 || errno != EAGAIN)
                    break;
                drain_events(e);
            }
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
        if (nfds == 3 && (fds[2].revents & (POLLIN | POLLHUP))) {
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
    join_thread(e);
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
    Py_RETURN_NONE;
}

/* Copy the data at image offset [off, off+len) into every region page that
 * still needs it (missing or requested), retrying while events are pending. */
static uint64_t install_image_range(Engine *e, uint64_t off, const uint8_t *data, uint64_t len,
                                    int kind)
{
    uint64_t installed = 0;
    for (int i = 0; i < e->nregions && e->state == E_RUNNING; i++) {
        region_t *r = &e->regions[i];
        uint64_t lo = off > r->offset ? off : r->offset;
        uint64_t hi = off + len < r->offset + r->size ? off + len : r->offset + r->size;
        if (lo >= hi)
            continue;
        uint64_t p = (lo - r->offset + r->page_size - 1) / r->page_size;
        uint64_t pend = (hi - r->offset) / r->page_size;
        int tries = 0;
        while (p < pend && e->state == E_RUNNING) {
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
    if (e->state == E_RUNNING && e->regions) {
        installed = install_image_range(e, off, data.buf, (uint64_t)data.len, kind);
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
    if (n && copy)
        memcpy(copy, e->requests.items, n * sizeof(uint64_t));
    e->requests.len = 0;
    pthread_mutex_unlock(&e->lock);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++)
        PyList_SET_ITEM(list, (Py_ssize_t)i, PyLong_FromUnsignedLongLong(copy[i]));
    free(copy);
    return list;
}

#define STAT(name, val)                                                               \
    do {                                                                              \
        PyObject *v_ = PyLong_FromUnsignedLongLong(val);                              \
        if (!v_ || PyDict_SetItemString(d, name, v_) < 0) {                           \
            Py_XDECREF(v_);                                                           \
            Py_DECREF(d);                                                             \
            pthread_mutex_unlock(&e->lock);                                           \
            return NULL;                                                              \
        }                                                                             \
        Py_DECREF(v_);                                                                \
    } while (0)

static PyObject *Engine_stats(Engine *e, PyObject *unused)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
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
    STAT("pages_eexist", e->pages_eexist);
    pthread_mutex_unlock(&e->lock);
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
 * for but the workload did not negotiate UFFD_FEATURE_POISON. */
static PyObject *Engine_fail(Engine *e, PyObject *args)
{
    const char *code;
    int poison;
    if (!PyArg_ParseTuple(args, "sp", &code, &poison))
        return NULL;
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

/* Mark pages already present in the workload (restart reconciliation):
 * present is one byte per page, in region order. */
static PyObject *Engine_mark_present(Engine *e, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((uint64_t)b.len != e->total) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "one byte per page expected");
        return NULL;
    }
    const uint8_t *src = b.buf;
    pthread_mutex_lock(&e->lock);
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        for (uint64_t p = 0; p < r->npages; p++, src++)
            if (*src)
                set_state(e, r, p, ST_PRESENT);
    }
    pthread_mutex_unlock(&e->lock);
    PyBuffer_Release(&b);
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
                uint64_t c = (r->offset + p * r->page_size) / chunk;
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
    {"mark_present", (PyCFunction)Engine_mark_present, METH_O, "Mark pages present."},
    {"wanted_chunks", (PyCFunction)Engine_wanted_chunks, METH_VARARGS,
     "Bitmap of chunks still holding missing data pages."},
    {"reconcile_pagemap", (PyCFunction)Engine_reconcile_pagemap, METH_O,
     "Mark pages the workload already has (from /proc/PID/pagemap) present."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Stop the fault thread."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Engine_getset[] = {
    {"state", (getter)Engine_get_state, NULL, "Engine state.", NULL},
    {"error", (getter)Engine_get_error, NULL, "Failure code or None.", NULL},
    {"features", (getter)Engine_get_features, NULL, "Negotiated uffd features.", NULL},
    {"uffd", (getter)Engine_get_uffd, NULL, "The engine's uffd copy (-1 when closed).", NULL},
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
    static char *kwlist[] = {"fd", "addr", "size", "wp", NULL};
    int fd, wp = 0;
    unsigned long long addr, size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKK|p", kwlist, &fd, &addr, &size, &wp))
        return NULL;
    struct uffdio_register reg = {.range = {addr, size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING |
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

static PyObject *mod_mmap_anon(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"size", "hugetlb", NULL};
    unsigned long long size;
    int huge = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|p", kwlist, &size, &huge))
        return NULL;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (huge)
        flags |= MAP_HUGETLB | MAP_HUGE_2MB;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0);
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

static PyMethodDef module_methods[] = {
    {"uffd_create", (PyCFunction)(void (*)(void))mod_uffd_create, METH_VARARGS | METH_KEYWORDS,
     "Create a userfaultfd with the given features."},
    {"uffd_features", mod_uffd_features, METH_O, "Negotiated features of a uffd (fdinfo)."},
    {"uffd_register", (PyCFunction)(void (*)(void))mod_uffd_register,
     METH_VARARGS | METH_KEYWORDS, "Register a range in MISSING (and WP) mode."},
    {"uffd_unregister", mod_uffd_unregister, METH_VARARGS, "Unregister a range."},
    {"pidfd_getfd", mod_pidfd_getfd, METH_VARARGS, "Copy another process's fd (pidfd_getfd)."},
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

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "pagewire._uffd",
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

PyMODINIT_FUNC PyInit__uffd(void)
{
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    UffdError = PyErr_NewExceptionWithDoc("pagewire._uffd.UffdError",
                                          "A userfaultfd operation failed.", PyExc_OSError, NULL);
    Py_INCREF(&EngineType);
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
