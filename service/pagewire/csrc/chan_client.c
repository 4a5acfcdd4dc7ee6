/*
 * The native data channel, destination side, inside the engine: urgent and bulk
 * connections to the source's DataServer, chunks checked and installed as they land.
 */
#include "uffd.h"
static void chan_fail(Engine *e, const char *why);

static void chan_install_run(Engine *e, const uint64_t *index, size_t n, const uint8_t *buf,
                             int kind, int wait);

static int tcp_connect(const char *host, int port, uint32_t kind)
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
        if ((kind & 0xff) != CHAN_KIND_URGENT)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    }
    if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) < 0) {
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

/* Connect (TLS 1.3 when tls is given, the server's certificate checked against host) and
 * say hello with the grant's token. On failure, why names the cause. */
int chan_connect(link_t *l, const char *host, int port, const uint8_t token[16], uint32_t kind,
                 SSL_CTX *tls, char *why, size_t n)
{
    link_plain(l, tcp_connect(host, port, kind));
    if (l->fd < 0) {
        snprintf(why, n, "%s", strerror(errno));
        return -1;
    }
    if (tls && link_tls(l, tls, 0, host, 5000) < 0) {
        link_tls_reason(l, why, n);
        link_close(l);
        return -1;
    }
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
    } reply = {{0}, 0};
    if (link_write(l, &hello, sizeof hello) < 0 || link_read(l, &reply, sizeof reply) < 0 ||
        memcmp(reply.ok, "PWOK", 4) != 0 || reply.status != CHAN_OK) {
        int busy = memcmp(reply.ok, "PWOK", 4) == 0 && reply.status == CHAN_BUSY;
        int said = memcmp(reply.ok, "PWOK", 4) == 0;
        snprintf(why, n, "%s",
                 busy ? "the source's data channel is at its connection limit (per peer or total)"
                 : said ? "the source refused the token (unknown, expired, already used or revoked)"
                 : "the source closed the connection before answering the hello");
        link_close(l);
        return -1;
    }
    return 0;
}

/* Wake every channel thread out of its socket wait: they see the channel down and end. */
static void chan_shutdown_links(struct chan *c)
{
    shutdown(c->urgent.fd, SHUT_RDWR);
    for (int i = 0; i < c->nbulk; i++)
        shutdown(c->bulk[i].link.fd, SHUT_RDWR);
}

/* The channel failed: every page it owed goes back to Python's queue (gRPC takes over). */
void chan_down_locked(Engine *e, const char *reason)
{
    struct chan *c = e->chan;
    if (!c || !c->up)
        return;
    c->up = 0;
    snprintf(c->down_reason, sizeof c->down_reason, "%s", reason);
    cache_release(c->cache, e);
    chan_shutdown_links(c);
    pending_t *items = e->pending.items;
    for (size_t i = 0; i < e->pending.len; i++) {
        region_t *r = &e->regions[items[i].region];
        if ((r->state[items[i].page] & ST_MASK) == ST_REQUESTED)
            queue_request(e, r, items[i].page);
    }
    signal_fd(e->notify_fd);
}

/* Does chunk k still hold a data page whose state is in `states` (a bit per state)? A
 * chunk gathered for its huge page holds nothing more to fetch. */
int chunk_holds(Engine *e, struct chan *c, uint64_t k, unsigned states)
{
    if (c->gathered && c->gathered[k])
        return 0;
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        uint64_t lo = k * c->chunk_size, hi = lo + c->chunk_size;
        if (hi <= r->offset || lo >= r->offset + r->size)
            continue;
        uint64_t p0 = lo > r->offset ? (lo - r->offset) / r->page_size : 0;
        uint64_t p1 = (hi - r->offset + r->page_size - 1) / r->page_size; /* a part of a huge page */
        if (p1 > r->npages)
            p1 = r->npages;
        for (uint64_t p = p0; p < p1; p++)
            if ((states & (1u << (r->state[p] & ST_MASK))) && !page_is_zero_src(r, p))
                return 1;
    }
    return 0;
}

/* Does chunk k still hold a missing data page? */
static int chunk_missing(Engine *e, struct chan *c, uint64_t k)
{
    return chunk_holds(e, c, k, 1u << ST_MISSING);
}

/* Does chunk k still hold a data page that is missing or waited for? */
static int chunk_needed(Engine *e, struct chan *c, uint64_t k)
{
    return chunk_holds(e, c, k, 1u << ST_MISSING | 1u << ST_REQUESTED);
}

uint64_t chunk_len_of(struct chan *c, uint64_t k)
{
    uint64_t end = (k + 1) * c->chunk_size;
    return (end > c->export_size ? c->export_size : end) - k * c->chunk_size;
}

/* How many chunks the bulk connection chunk k was asked for on has received. */
static uint32_t bulk_done_seq(struct chan *c, uint64_t k)
{
    return __atomic_load_n(&c->bulk[c->bulk_conn_of[k]].done_seq, __ATOMIC_RELAXED);
}

/* Bytes in this host's socket buffer for the bulk connection chunk k was asked for on. */
static int bulk_queued(struct chan *c, uint64_t k)
{
    int queued = 0;
    if (ioctl(c->bulk[c->bulk_conn_of[k]].link.fd, SIOCINQ, &queued) < 0)
        queued = 0;
    return queued;
}

/* Is chunk k (asked for on a bulk connection) close enough to be waited for: fewer than
 * BULK_WAIT chunks ahead of it that have not reached this host's socket buffer yet? */
static int bulk_soon(struct chan *c, uint64_t k)
{
    uint32_t ahead = c->bulk_seq[k] - bulk_done_seq(c, k);
    return ahead < BULK_WAIT + (uint64_t)bulk_queued(c, k) / c->chunk_size;
}

/* Under the engine lock: a fault waits for chunk k, asked for on a bulk connection, if it
 * is close enough there and a wait slot is free (chan_bulk_waits_locked watches it). */
int chan_wait_on_bulk_locked(struct chan *c, uint64_t k)
{
    if (c->nbulk_waits >= BULK_WAIT_SLOTS || !bulk_soon(c, k))
        return 0;
    uint32_t i = c->nbulk_waits++;
    c->bulk_waits[i] = k;
    c->bulk_wait_since[i] = now_ns();
    c->bulk_wait_seq[i] = bulk_done_seq(c, k);
    c->chunks_waited++;
    return 1;
}

/* Under the engine lock: a fault's chunk (and, while faults run forward, the chunks its
 * window reaches) goes to the outbox; nothing is written or hashed here. A chunk already
 * on its way, urgent or bulk, is waited for, never fetched twice. */
int chan_request_locked(Engine *e, region_t *r, uint64_t p)
{
    struct chan *c = e->chan;
    if (!c || !c->up)
        return 0;
    uint64_t chunk = (r->offset + p * r->page_size) / c->chunk_size;
    if (chunk >= c->nchunks)
        return 0;
    if (c->unit > 1)
        return chan_request_unit_locked(e, c, chunk);
    if (c->asked[chunk] == ASK_URGENT) {
        c->chunks_waited++;
        return 1;
    }
    if (c->asked[chunk] == ASK_BULK && chan_wait_on_bulk_locked(c, chunk))
        return 1;
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

/* Under the engine lock, on each turn of the fault thread: a chunk a fault waits for on
 * a stalled bulk connection is asked for urgently (the source skips it on the bulk
 * connection if it has not sent it yet). Returns how many faults still wait on bulk, so
 * the fault thread looks again soon. */
int chan_bulk_waits_locked(Engine *e)
{
    struct chan *c = e->chan;
    if (!c || !c->up)
        return 0;
    uint64_t now = now_ns();
    uint32_t kept = 0;
    for (uint32_t i = 0; i < c->nbulk_waits; i++) {
        uint64_t k = c->bulk_waits[i];
        if (c->asked[k] != ASK_BULK || !chunk_needed(e, c, k))
            continue; /* arrived, or asked for urgently since */
        uint32_t seq = bulk_done_seq(c, k);
        if (seq != c->bulk_wait_seq[i]) { /* it received since: wait on */
            c->bulk_wait_seq[i] = seq;
            c->bulk_wait_since[i] = now;
        }
        uint64_t waited = now - c->bulk_wait_since[i];
        int burst = c->ws_pos < c->nws; /* a working set is still being asked for */
        int stalled = waited >= BULK_WAIT_MAX_NS ||
                      (waited >= BULK_WAIT_NS && (!burst || bulk_queued(c, k)));
        if (!stalled || c->nout >= CHAN_MAX_REQ) {
            c->bulk_waits[kept] = k;
            c->bulk_wait_since[kept] = c->bulk_wait_since[i];
            c->bulk_wait_seq[kept++] = c->bulk_wait_seq[i];
            continue;
        }
        c->outbox[c->nout++] = k;
        c->asked[k] = ASK_URGENT;
        if (c->outstanding++ == 0)
            c->last_answer_ns = now;
        c->bulk_waits_expired++;
    }
    c->nbulk_waits = kept;
    return (int)kept;
}

/* The fault thread, without the engine lock: install what the host's cache holds, send
 * the rest of the outbox on the urgent connection. */
void chan_flush_urgent(Engine *e)
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
    /* a huge page's install from here could stop short with its chunks spent: the urgent
     * connection brings them instead */
    ChunkCache *cache = c->unit > 1 ? NULL : __atomic_load_n(&c->cache, __ATOMIC_ACQUIRE);
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
    if (m && (link_write(&c->urgent, head, sizeof head) < 0 ||
              link_write(&c->urgent, c->sendbuf, m * 8) < 0))
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

/* Read one answer into buf (the whole chunk, zero pages filled in) and verify it. A bulk
 * answer the source skipped (its urgent connection sent that chunk) has *len_out 0. */
int64_t chan_receive(struct chan *c, link_t *l, uint8_t *buf, uint8_t *stage,
                     uint64_t *len_out, const char **why)
{
    chan_answer_t a;
    if (link_read(l, &a, sizeof a) < 0) {
        *why = "connection lost";
        return -1;
    }
    int zstd = (a.status & CHAN_ZSTD) != 0;
    a.status &= 0xffff;
    if (a.status == CHAN_SKIPPED && a.data_len == 0 && a.index < c->nchunks) {
        *len_out = 0;
        return (int64_t)a.index;
    }
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
        if (a.data_len > c->chunk_size + 4096 || link_read(l, packed, a.data_len) < 0 ||
            zstd_unpack(whole ? buf : stage, expect, packed, a.data_len) != (int64_t)expect) {
            *why = "bad compressed chunk";
            return -1;
        }
    } else if (a.data_len != expect || link_read(l, whole ? buf : stage, a.data_len) < 0) {
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
 * indexes go in with one copy per run), and forget that they were asked for. The engine
 * lock is held for at most INSTALL_PIECE chunks at a time, so a fault's install never
 * waits behind a whole bulk run. */
static void chan_install_run(Engine *e, const uint64_t *index, size_t n, const uint8_t *buf,
                             int kind, int wait)
{
    struct chan *c = e->chan;
    int notify = 0, bulk = kind == KIND_BACKGROUND;
    if (bulk)
        pthread_mutex_lock(&c->install_lock);
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && j - i < INSTALL_PIECE && index[j] == index[j - 1] + 1)
            j++;
        uint64_t off = index[i] * c->chunk_size;
        uint64_t end = (index[j - 1] + 1) * c->chunk_size;
        pthread_mutex_lock(&e->lock);
        if (e->state == E_RUNNING) {
            if (c->unit > 1) /* huge pages: each chunk gathered, its page installed whole */
                for (size_t k = i; k < j; k++)
                    chan_gather_locked(e, index[k], buf + k * c->chunk_size, kind);
            else
                install_image_range(e, off, buf + i * c->chunk_size,
                                    (end < c->export_size ? end : c->export_size) - off, kind,
                                    wait);
            settle_pending(e);
            notify = all_done(e);
        }
        for (size_t k = i; k < j; k++)
            c->asked[index[k]] = ASK_NONE;
        pthread_mutex_unlock(&e->lock);
        i = j;
    }
    if (bulk)
        pthread_mutex_unlock(&c->install_lock);
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
    rt_budget_t budget = urgent_priority(1);
    struct chan *c = e->chan;
    uint8_t *buf = malloc(2 * c->chunk_size + 4096), *stage = malloc(c->chunk_size);
    while (buf && stage && __atomic_load_n(&c->up, __ATOMIC_ACQUIRE) &&
           e->state == E_RUNNING) {
        if (link_wait(&c->urgent, 200) == 0) {
            pthread_mutex_lock(&e->lock);
            int stalled = c->outstanding && now_ns() - c->last_answer_ns > CHAN_STALL_NS;
            if (stalled)
                chan_down_locked(e, "urgent answers stalled");
            pthread_mutex_unlock(&e->lock);
            continue;
        }
        const char *why = "";
        uint64_t len = 0;
        int64_t index = chan_receive(c, &c->urgent, buf, stage, &len, &why);
        if (index >= 0 && len == 0) {
            index = -1;
            why = "skipped answer on the urgent connection";
        }
        if (index < 0) {
            chan_fail(e, why);
            break;
        }
        pthread_mutex_lock(&e->lock);
        if (c->outstanding == 0) { /* more answers than requests: a source to stop hearing */
            chan_down_locked(e, "urgent answer nobody asked for");
            pthread_mutex_unlock(&e->lock);
            break;
        }
        c->outstanding--;
        c->last_answer_ns = now_ns();
        c->chunks_urgent++;
        pthread_mutex_unlock(&e->lock);
        uint64_t k = (uint64_t)index;
        chan_install_run(e, &k, 1, buf, KIND_PREFETCH, 1); /* asked-for pages count as faults */
        cache_fill(__atomic_load_n(&c->cache, __ATOMIC_ACQUIRE), c->digests + k * 32, buf,
                   (uint32_t)len);
        rt_budget_check(&budget);
    }
    free(buf);
    free(stage);
    return NULL;
}
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

static int chan_send_batch(link_t *l, const uint64_t *idx, size_t n)
{
    uint32_t head[2] = {(uint32_t)n, 0};
    return link_write(l, head, sizeof head) < 0 || link_write(l, idx, n * 8) < 0 ? -1 : 0;
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
    /* the working set: a deeper burst, shared by the bulk connections */
    size_t limit = c->ws_pos < c->nws ? (b->cap < WS_DEPTH ? b->cap : WS_DEPTH) : b->depth;
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
    for (size_t i = 0; i < n; i++) {
        c->bulk_seq[want[i]] = ++b->conn->asked_seq;
        c->bulk_conn_of[want[i]] = (uint8_t)(b->conn - c->bulk);
    }
    pthread_mutex_unlock(&e->lock);
    if (chan_send_batch(b->link, want, n) < 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        b->fifo[(b->head + b->count + i) % b->cap] = want[i];
    b->count += n;
    return (int)n;
}

static void *chan_bulk_thread(void *arg)
{
    struct bulk_conn *conn = arg;
    Engine *e = conn->e;
    bulk_priority();
    struct chan *c = e->chan;
    bulk_t b = {0};
    b.conn = conn;
    b.link = &conn->link;
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
        int64_t index = chan_receive(c, b.link, b.buf + b.nrun * c->chunk_size, b.stage,
                                     &len, &why);
        if (index < 0)
            break;
        if ((uint64_t)index != expect) {
            why = "bulk answer out of order";
            break;
        }
        b.head = (b.head + 1) % b.cap;
        b.count--;
        __atomic_add_fetch(&conn->done_seq, 1, __ATOMIC_RELAXED);
        if (len == 0) { /* skipped: the urgent connection brings it */
            __atomic_add_fetch(&c->chunks_skipped, 1, __ATOMIC_RELAXED);
            pthread_mutex_lock(&e->lock);
            if (c->asked[index] == ASK_BULK) /* not asked urgently since: a later pass may */
                c->asked[index] = ASK_NONE;
            pthread_mutex_unlock(&e->lock);
            if (b.nrun && link_wait(b.link, 0) <= 0)
                bulk_flush(e, &b);
            continue;
        }
        __atomic_add_fetch(&c->chunks_bulk, 1, __ATOMIC_RELAXED);
        b.run[b.nrun++] = (uint64_t)index;
        int next_follows = b.count > 0 && b.fifo[b.head] == (uint64_t)index + 1;
        /* a fault may be waiting for this run: do not hold it back to batch more */
        int waited = __atomic_load_n(&e->pending.len, __ATOMIC_RELAXED) > 0;
        if (b.nrun == b.run_cap || !next_follows || waited || link_wait(b.link, 0) <= 0)
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

void chan_stop(Engine *e)
{
    struct chan *c = e->chan;
    if (!c)
        return;
    pthread_mutex_lock(&e->lock);
    c->up = 0;
    pthread_mutex_unlock(&e->lock);
    chan_shutdown_links(c);
    Py_BEGIN_ALLOW_THREADS if (c->urx_started) pthread_join(c->urx, NULL);
    for (int i = 0; i < c->nbulk; i++)
        if (c->bulk[i].started)
            pthread_join(c->bulk[i].tid, NULL);
    cache_release(c->cache, e);
    Py_END_ALLOW_THREADS c->urx_started = 0;
    for (int i = 0; i < c->nbulk; i++)
        c->bulk[i].started = 0;
}

/* Close and free a channel no thread uses any more. */
static void chan_destroy(struct chan *c)
{
    link_close(&c->urgent);
    for (int i = 0; i < c->nbulk; i++)
        link_close(&c->bulk[i].link);
    free(c->zmap);
    free(c->digests);
    free(c->fast);
    free(c->asked);
    free(c->hitbuf);
    free(c->outbox);
    free(c->sendbuf);
    free(c->ws);
    free(c->bulk_seq);
    free(c->bulk_conn_of);
    Py_XDECREF((PyObject *)c->cache);
    pthread_mutex_destroy(&c->install_lock);
    chan_gather_free(c);
    free(c);
}

void chan_free(Engine *e)
{
    if (e->chan)
        chan_destroy(e->chan);
    e->chan = NULL;
}

/* The channel's threads run only while the engine does. */
void chan_start_threads(Engine *e)
{
    struct chan *c = e->chan;
    if (!c || c->urx_started)
        return;
    c->urx_started = pthread_create(&c->urx, NULL, chan_urgent_thread, e) == 0;
    for (int i = 0; i < c->nbulk; i++) {
        c->bulk[i].e = e;
        struct bulk_conn *b = &c->bulk[i];
        b->started = pthread_create(&b->tid, NULL, chan_bulk_thread, b) == 0;
    }
}

/* An export's description as Describe gave it: chunk and page sizes that divide, a zero
 * map byte per page, a SHA-256 (and, when given, an XXH3-128) per chunk. */
int chan_desc_ok(uint64_t cs, uint64_t size, uint64_t eps, const Py_buffer *zm,
                 const Py_buffer *dg, const Py_buffer *fd)
{
    uint64_t nchunks = cs ? (size + cs - 1) / cs : 0;
    return eps && cs && cs % eps == 0 && size % eps == 0 && (uint64_t)zm->len == size / eps &&
           (uint64_t)dg->len == nchunks * 32 && (!fd || (uint64_t)fd->len == nchunks * 16);
}

PyObject *Engine_attach_channel(Engine *e, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host",     "port",    "token",      "chunk_size",  "export_size",
                             "export_page_size", "zero_map", "digests", "background",
                             "compression", "cache", "fast_digests", "working_set", "tls_cert",
                             "tls_key", "tls_ca", NULL};
    const char *host, *cert = NULL, *key = NULL, *ca = NULL;
    int port, background = 1, compression = 0;
    PyObject *cache_obj = Py_None;
    Py_buffer tok, zm, dg, fd = {0}, ws = {0};
    unsigned long long cs, size, eps;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "siy*KKKy*y*|ppOz*z*zzz", kwlist, &host,
                                     &port, &tok, &cs, &size, &eps, &zm, &dg, &background,
                                     &compression, &cache_obj, &fd, &ws, &cert, &key, &ca))
        return NULL;
    PyObject *result = NULL;
    uint64_t nchunks = cs ? (size + cs - 1) / cs : 0;
    if (cache_obj != Py_None && !PyObject_TypeCheck(cache_obj, &ChunkCacheType)) {
        PyErr_SetString(PyExc_TypeError, "cache must be a ChunkCache or None");
        goto out;
    }
    if (e->chan || e->state > E_RUNNING || tok.len != 16 ||
        !chan_desc_ok(cs, size, eps, &zm, &dg, fd.buf ? &fd : NULL) || (ws.buf && ws.len % 8)) {
        PyErr_SetString(PyExc_ValueError, "bad channel description (or engine not running)");
        goto out;
    }
    int unit = chan_unit_chunks(e, cs);
    if (unit < 0) {
        PyErr_SetString(PyExc_ValueError, "pages the channel cannot gather: regions of "
                                          "different page sizes, a page of more than 64 "
                                          "chunks, or one off a page boundary of the image");
        goto out;
    }
    uint8_t token[16];
    memcpy(token, tok.buf, 16);
    uint32_t zflag = compression && zstd_compress_fn ? CHAN_ZSTD : 0;
    int want_bulk = background || (ws.buf && ws.len > 0);
    char why[256] = "TLS needs a certificate, a key and a CA";
    SSL_CTX *tls = NULL;
    if ((cert || key || ca) && (!cert || !key || !ca || !(tls = tls_context(0, cert, key, ca, why,
                                                                            sizeof why)))) {
        PyErr_Format(PyExc_ValueError, "native channel: %s", why);
        goto out;
    }
    struct chan *c = calloc(1, sizeof *c);
    if (!c) {
        SSL_CTX_free(tls);
        PyErr_NoMemory();
        goto out;
    }
    pthread_mutex_init(&c->install_lock, NULL);
    int nbulk = !want_bulk ? 0 : sysconf(_SC_NPROCESSORS_ONLN) >= 2 ? BULK_CONNS : 1;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = chan_connect(&c->urgent, host, port, token,
                                             CHAN_KIND_URGENT | zflag, tls, why, sizeof why);
    for (; rc == 0 && c->nbulk < nbulk; c->nbulk++)
        rc = chan_connect(&c->bulk[c->nbulk].link, host, port, token, CHAN_KIND_BULK | zflag,
                          tls, why, sizeof why);
    if (rc < 0) {
        for (int i = 0; i < c->nbulk - 1; i++)
            link_close(&c->bulk[i].link);
        if (c->urgent.ssl || c->urgent.fd >= 0)
            link_close(&c->urgent);
    }
    Py_END_ALLOW_THREADS SSL_CTX_free(tls);
    if (rc < 0) {
        pthread_mutex_destroy(&c->install_lock);
        free(c);
        PyErr_Format(PyExc_ConnectionError, "native channel to %s:%d: %s", host, port, why);
        goto out;
    }
    c->background = background, c->compress = zflag != 0;
    c->chunk_size = cs, c->export_size = size, c->export_ps = eps, c->nchunks = nchunks;
    c->zmap = malloc((size_t)zm.len + 1);
    c->digests = malloc((size_t)dg.len + 1);
    c->asked = calloc(nchunks + 1, 1);
    c->hitbuf = malloc(cs);
    c->outbox = malloc(CHAN_MAX_REQ * sizeof(uint64_t));
    c->bulk_seq = calloc(nchunks + 1, sizeof(uint32_t));
    c->bulk_conn_of = calloc(nchunks + 1, 1);
    c->sendbuf = malloc(CHAN_MAX_REQ * sizeof(uint64_t));
    c->fast = fd.buf && fd.len ? malloc((size_t)fd.len) : NULL;
    c->nws = ws.buf ? (uint64_t)ws.len / 8 : 0;
    c->ws = c->nws ? malloc((size_t)ws.len) : NULL;
    if (cache_obj != Py_None) {
        Py_INCREF(cache_obj);
        c->cache = (ChunkCache *)cache_obj;
    }
    if (chan_gather_init(c, (uint64_t)unit) < 0 || !c->zmap || !c->digests || !c->asked ||
        !c->hitbuf || !c->outbox || !c->bulk_seq || !c->bulk_conn_of || !c->sendbuf ||
        (fd.buf && fd.len && !c->fast) || (c->nws && !c->ws)) {
        chan_destroy(c); /* never published: no engine thread has seen it */
        PyErr_NoMemory();
        goto out;
    }
    memcpy(c->zmap, zm.buf, (size_t)zm.len);
    memcpy(c->digests, dg.buf, (size_t)dg.len);
    if (c->fast)
        memcpy(c->fast, fd.buf, (size_t)fd.len);
    if (c->ws)
        memcpy(c->ws, ws.buf, (size_t)ws.len);
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
PyObject *Engine_share_cache(Engine *e, PyObject *arg)
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

PyObject *Engine_get_channel(Engine *e, void *unused)
{
    struct chan *c = e->chan;
    if (!c)
        Py_RETURN_NONE;
    pthread_mutex_lock(&e->lock);
    PyObject *d = Py_BuildValue(
        "{sOsssKsKsKsKsKsKsKsK}", "up", c->up ? Py_True : Py_False, "down_reason",
        c->down_reason, "chunks_waited", (unsigned long long)c->chunks_waited,
        "bulk_waits_expired", (unsigned long long)c->bulk_waits_expired,
        "chunks_cached", (unsigned long long)c->chunks_cached, "chunks_skipped",
        (unsigned long long)c->chunks_skipped,
        "bytes_received", (unsigned long long)c->bytes_received, "digest_failures",
        (unsigned long long)c->digest_failures, "chunks_urgent",
        (unsigned long long)c->chunks_urgent, "chunks_bulk", (unsigned long long)c->chunks_bulk);
    pthread_mutex_unlock(&e->lock);
    return d;
}
