/*
 * The fault engine: page states, installs (COPY/ZEROPAGE/POISON), fault and event
 * handling, background fill, completion and teardown, and the fault thread.
 */
#include "uffd.h"

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
int install_run(Engine *e, region_t *r, uint64_t p, uint64_t n, const uint8_t *src,
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

int page_is_zero_src(region_t *r, uint64_t p) { return (r->state[p] & SRC_ZERO) != 0; }

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

void queue_request(Engine *e, region_t *r, uint64_t p)
{
    uint64_t off = r->offset + p * r->page_size;
    vec_push(&e->requests, &off);
}

/* Remember the chunk holding image offset off, once, in first-touch order. */
void record_offset(Engine *e, uint64_t off)
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

/* Decide one fault from current state. Returns 1 if resolved, 0 if it must
 * be retried after events are drained, -1 if it now waits for Python. */
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
    case ST_REMOVED: {
        uint64_t eexist = e->pages_eexist;
        rc = install_run(e, r, p, 1, NULL, ST_REMOVED, &done);
        if (rc == INS_AGAIN)
            return 0;
        if (e->pages_eexist != eexist)
            wake_page(e, r, p); /* present already: no install woke this thread */
        record_fault(e, RES_ZERO, t0);
        return 1;
    }
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
void settle_pending(Engine *e)
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

/* POISON is probed, not read from the feature bits: from 6.6 the kernel offers it on
 * every uffd (Firecracker negotiates only EVENT_REMOVE). */
static void poison_page_or_fail(Engine *e, uint64_t addr)
{
    e->faults_unknown++;
    struct uffdio_poison po = {.range = {addr & ~(e->sys_page - 1), e->sys_page}, .mode = 0};
    if (ioctl(e->uffd, UFFDIO_POISON, &po) < 0 && (errno == ENOTTY || errno == EINVAL))
        engine_fail_locked(e, "fault_outside_regions");
}

/* Read one batch of queued messages: apply events, queue faults to be decided. Returns
 * the number read, or -1 when the engine failed. */
static int read_messages(Engine *e)
{
    struct uffd_msg msgs[UFFD_MSG_BATCH];
    ssize_t n = read(e->uffd, msgs, sizeof msgs);
    uint64_t t0 = now_ns();
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
        engine_fail_locked(e, errno == ESRCH ? "workload_exited" : "uffd_read_failed");
        return -1;
    }
    int nmsg = n > 0 ? (int)(n / (ssize_t)sizeof(struct uffd_msg)) : 0;
    for (int i = 0; i < nmsg; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
            handle_event(e, &msgs[i]);
            continue;
        }
        fault_t f = {msgs[i].arg.pagefault.address, t0};
        if (vec_push(&e->retry, &f) < 0) { /* fail closed: the policy poisons what is missing */
            engine_fail_locked(e, "out_of_memory");
            return -1;
        }
    }
    return nmsg;
}

/* Decide the queued faults; keep those that met -EAGAIN (an event not yet completed)
 * for the next turn. Once read, a fault is not delivered again: dropping one would
 * leave its thread asleep. */
static void decide_faults(Engine *e)
{
    fault_t *items = e->retry.items;
    size_t keep = 0;
    for (size_t i = 0; i < e->retry.len && e->state == E_RUNNING; i++) {
        int ri = find_region(e, items[i].addr);
        if (ri < 0) {
            poison_page_or_fail(e, items[i].addr);
            continue;
        }
        region_t *r = &e->regions[ri];
        uint64_t p = (items[i].addr - r->base) / r->page_size;
        if (decide_fault(e, ri, p, items[i].t0) == 0)
            items[keep++] = items[i];
    }
    e->retry.len = keep;
}

/* Drain the queued messages (readable: the uffd polled readable) and decide faults. */
static void handle_messages(Engine *e, int readable)
{
    for (int rounds = 0; rounds < 64 && e->state == E_RUNNING; rounds++) {
        int nmsg = readable ? read_messages(e) : 0;
        if (nmsg < UFFD_MSG_BATCH)
            readable = 0;
        decide_faults(e);
        settle_pending(e);
        if (!readable)
            break;
    }
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

/* Unregister every region, then wake its waiters. The kernel wakes them itself before it
 * clears the range, but a fault taken under the per-VMA lock can queue itself between that
 * wake and the clear (seen on 6.18): without our wake its thread sleeps for good. */
static void unregister_all(Engine *e)
{
    for (int i = 0; i < e->nregions; i++) {
        struct uffdio_range rg = {e->regions[i].base, e->regions[i].size};
        ioctl(e->uffd, UFFDIO_UNREGISTER, &rg);
        ioctl(e->uffd, UFFDIO_WAKE, &rg);
    }
}

static void discard_events(int uffd);

/* Unregister, then read (and drop) the events still coming. A madvise that passed the
 * kernel's userfaultfd check before the unregister queues its REMOVE event a moment
 * later and waits until it is read; the workload holds its own copy of the uffd (as
 * Firecracker does), so closing ours would not release it: it would wait forever. Wait
 * until no event came for UFFD_QUIET_MS. */
void close_uffd(Engine *e)
{
    if (e->uffd < 0)
        return;
    unregister_all(e);
    struct pollfd pfd = {e->uffd, POLLIN, 0};
    for (int i = 0; i < 100; i++) {
        discard_events(e->uffd);
        if (poll(&pfd, 1, UFFD_QUIET_MS) <= 0)
            break;
    }
    close(e->uffd);
    e->uffd = -1;
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
int64_t poison_range(int uffd, uint64_t addr, uint64_t len, uint64_t page)
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
int poison_missing(Engine *e)
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

void *fault_thread(void *arg)
{
    Engine *e = arg;
    /* a local source's whole fill runs on this thread: it keeps the default scheduling */
    rt_budget_t budget = {0};
    if (e->source_fd < 0)
        budget = urgent_priority(1);
    struct pollfd fds[3] = {{e->uffd, POLLIN, 0}, {e->ctl_fd, POLLIN, 0}, {e->pidfd, POLLIN, 0}};
    int nfds = e->pidfd >= 0 ? 3 : 2;
    int more_bg = e->background, waiting_on_bulk = 0;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        int stop = e->stop || e->state != E_RUNNING;
        pthread_mutex_unlock(&e->lock);
        if (stop)
            break;
        /* waiting on bulk: look again a quarter of BULK_WAIT_NS later; faults that met
         * -EAGAIN: once the madvise behind it has finished */
        long tick_ns = e->retry.len ? RETRY_TICK_NS : waiting_on_bulk ? (long)(BULK_WAIT_NS / 4) : 0;
        struct timespec tick = {more_bg || tick_ns ? 0 : 1, tick_ns};
        int rc = ppoll(fds, (nfds_t)nfds, &tick, NULL);
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
        int readable = (fds[0].revents & (POLLIN | POLLERR | POLLHUP)) != 0;
        if (e->state == E_RUNNING && (readable || e->retry.len))
            handle_messages(e, readable);
        if (e->state == E_RUNNING && more_bg && !e->stop)
            more_bg = background_step(e);
        waiting_on_bulk = e->state == E_RUNNING && chan_bulk_waits_locked(e) > 0;
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
        rt_budget_check(&budget);
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
