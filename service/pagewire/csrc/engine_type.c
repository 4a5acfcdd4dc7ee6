/*
 * pagewire._uffd.Engine: the Python type over one session's engine. Every call
 * that may block releases the GIL; no Python object is built under the engine lock.
 */
#include "uffd.h"

/* ---- Python type ---------------------------------------------------------- */

uint64_t read_fdinfo_features(int fd)
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
    free(e->retry.items);
    e->pending.items = e->requests.items = e->retry.items = NULL;
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
    e->retry.item_size = sizeof(fault_t);
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    /* the fault path's real-time threads wait on it: its holder inherits their priority */
    pthread_mutexattr_setprotocol(&ma, PTHREAD_PRIO_INHERIT);
    pthread_mutex_init(&e->lock, &ma);
    pthread_mutexattr_destroy(&ma);
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
uint64_t install_image_range(Engine *e, uint64_t off, const uint8_t *data, uint64_t len,
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

PyTypeObject EngineType = {
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
