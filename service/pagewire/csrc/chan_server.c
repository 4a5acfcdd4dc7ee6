/*
 * The native data channel, source side (DataServer): grants, hello deadline,
 * connection limits, and chunks sent from the export's file with sendfile.
 */
#include "uffd.h"

static void server_remove_export_locked(DataServer *s, int id);

/* ---- data server: grants (hash on the token), export references ---- */

static unsigned grant_bucket(const uint8_t token[16])
{
    uint32_t h;
    memcpy(&h, token, 4);
    return h % GRANT_BUCKETS;
}

/* Lock held. */
static void session_put(chan_session_t *sess)
{
    if (sess && --sess->refs == 0) {
        free(sess->served);
        free(sess);
    }
}

static void grant_unlink(DataServer *s, grant_t **at)
{
    grant_t *g = *at;
    *at = g->next;
    session_put(g->session);
    free(g);
    s->ngrants--;
}

/* The export id a grant gives a connection of this kind, or -1; uses the grant up. The
 * connection gets a reference on the grant's session. */
static int grant_take(DataServer *s, const uint8_t token[16], uint32_t kind,
                      chan_session_t **sess)
{
    if (!s->grants || kind < CHAN_KIND_URGENT || kind > CHAN_KIND_STAGE)
        return -1;
    for (grant_t **at = &s->grants[grant_bucket(token)]; *at; at = &(*at)->next) {
        grant_t *g = *at;
        if (memcmp(g->token, token, 16) != 0)
            continue;
        int id = -1;
        if (now_ns() < g->expires_ns && g->left[kind] > 0) {
            id = g->export_id;
            g->left[kind]--;
            *sess = g->session;
            g->session->refs++;
        }
        /* the engine's connections used up: done (staging comes before them or not) */
        if (id < 0 || g->left[CHAN_KIND_URGENT] + g->left[CHAN_KIND_BULK] == 0)
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
    session_put(c->session);
    c->session = NULL;
    if (ex && --ex->refs == 0 && ex->removed)
        export_free(ex);
    pthread_mutex_unlock(&s->lock);
}

static dexport_t *server_export_for(DataServer *s, conn_t *c, const uint8_t token[16],
                                    uint32_t kind)
{
    dexport_t *ex = NULL;
    pthread_mutex_lock(&s->lock);
    chan_session_t *sess = NULL;
    int id = grant_take(s, token, kind, &sess);
    if (id >= 0 && id < s->nexports && s->exports[id] && !s->exports[id]->removed) {
        ex = s->exports[id];
        ex->refs++;
        c->ex = ex;
        c->kind = (int)kind;
        if (!sess->served) {
            sess->served = calloc(ex->nchunks + 1, 1);
            sess->nchunks = sess->served ? ex->nchunks : 0;
        }
        c->session = sess;
    } else if (sess) {
        session_put(sess);
    }
    pthread_mutex_unlock(&s->lock);
    return ex;
}

static void count_hello_timeout(DataServer *s)
{
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ETIMEDOUT)
        __atomic_add_fetch(&s->hello_timeouts, 1, __ATOMIC_RELAXED);
}

/* Under mTLS: the handshake (within the hello deadline), then the client's certificate
 * against --peer-allow. */
static int accept_tls(DataServer *s, link_t *l)
{
    errno = 0;
    if (link_tls(l, s->tls, 1, NULL, LIMIT_OR(s->hello_ms, 2000)) == 0 &&
        link_peer_allowed(l, s->allow, s->nallow))
        return 0;
    count_hello_timeout(s);
    __atomic_add_fetch(&s->refused, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->refused_tls, 1, __ATOMIC_RELAXED);
    return -1;
}

/* The hello must come within hello_ms; after it, reads block again. */
static int read_hello(DataServer *s, link_t *l, void *hello, size_t len)
{
    int ms = LIMIT_OR(s->hello_ms, 2000);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000}, none = {0, 0};
    setsockopt(l->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    l->timeout_ms = ms;
    int rc = link_read(l, hello, len);
    if (rc < 0)
        count_hello_timeout(s);
    setsockopt(l->fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    l->timeout_ms = -1;
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

static int send_answer(link_t *l, chan_answer_t *a, const uint8_t *data)
{
    return link_write(l, a, sizeof *a) < 0 || link_write(l, data, a->data_len) < 0 ? -1 : 0;
}

/* The chunk's non-zero pages, read into buf (one pread per run of them); returns their
 * length or -1. */
static int64_t read_data_pages(dexport_t *ex, uint64_t first, uint64_t last, uint8_t *buf)
{
    uint64_t used = 0;
    for (uint64_t p = first; p < last;) {
        if (ex->zero_map[p]) {
            p++;
            continue;
        }
        uint64_t q = p;
        while (q < last && !ex->zero_map[q])
            q++;
        uint64_t want = (q - p) * ex->page_size, got = 0;
        while (got < want) {
            ssize_t n = pread(ex->fd, buf + used + got, want - got,
                              (off_t)(p * ex->page_size + got));
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return -1;
            got += (uint64_t)n;
        }
        used += want;
        p = q;
    }
    return (int64_t)used;
}

/* One chunk's non-zero pages: zstd-compressed when asked for and it pays; read into raw
 * (after room for the answer, so TLS sends one record run) when there is a raw buffer
 * (compression or TLS); otherwise straight from the page cache with sendfile. */
static int send_chunk(DataServer *s, conn_t *c, link_t *l, uint64_t index, uint8_t *raw,
                      uint8_t *packed)
{
    dexport_t *ex = c->ex;
    chan_session_t *sess = c->session;
    chan_answer_t a = {index, 0, CHAN_OK};
    if (index >= ex->nchunks)
        a.status = CHAN_RANGE;
    else if (!export_unchanged(ex))
        a.status = CHAN_STALE;
    if (a.status != CHAN_OK)
        return link_write(l, &a, sizeof a) < 0 ? -1 : 1;
    if (index < sess->nchunks && c->kind == CHAN_KIND_URGENT) {
        __atomic_store_n(&sess->served[index], 1, __ATOMIC_RELAXED);
    } else if (index < sess->nchunks &&
               __atomic_exchange_n(&sess->served[index], 0, __ATOMIC_RELAXED)) {
        /* once per urgent send: a later bulk ask for it (its install fell short) gets data */
        a.status = CHAN_SKIPPED;
        __atomic_add_fetch(&s->chunks_skipped, 1, __ATOMIC_RELAXED);
        return link_write(l, &a, sizeof a);
    }
    uint64_t per = ex->chunk_size / ex->page_size, first = index * per;
    uint64_t last = first + per < ex->npages ? first + per : ex->npages;
    for (uint64_t p = first; p < last; p++)
        a.data_len += ex->zero_map[p] ? 0 : (uint32_t)ex->page_size;
    uint32_t raw_len = a.data_len;
    if (raw && raw_len) {
        uint8_t *data = raw + sizeof a;
        if (read_data_pages(ex, first, last, data) != raw_len)
            return -1;
        int64_t z = packed ? zstd_pack(packed, ex->chunk_size + 4096, data, raw_len) : -1;
        int pays = z > 0 && (uint64_t)z < (uint64_t)raw_len * 7 / 8;
        a.data_len = pays ? (uint32_t)z : raw_len;
        a.status |= pays ? CHAN_ZSTD : 0;
        memcpy(raw, &a, sizeof a);
        if (pays ? send_answer(l, &a, packed) < 0 : link_write(l, raw, sizeof a + raw_len) < 0)
            return -1;
    } else if (l->ssl) { /* TLS, no data page: the header alone */
        if (link_write(l, &a, sizeof a) < 0)
            return -1;
    } else { /* plain text: the header joins the data's segment */
        if (send_full(l->fd, &a, sizeof a, a.data_len ? MSG_MORE : 0) < 0)
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
                ssize_t n = sendfile(l->fd, ex->fd, &off, left);
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

/* TLS writes a chunk as four 16 KiB records, each its own write(); with TCP_NODELAY each
 * would leave as its own segment and wake the receiver. A bulk batch is corked, so they
 * leave in full segments (uncorking sends the rest at once): 1 GiB under mTLS, 4 runs
 * each, bulk +12%, source CPU -10%. Urgent answers are not: corked, a fault's chunk left
 * only once all of it was encrypted (p50 +30%). Plain text joins header and data with
 * MSG_MORE instead. */
static void tls_cork(const conn_t *c, link_t *l, int on)
{
    if (l->ssl && c->kind != CHAN_KIND_URGENT)
        setsockopt(l->fd, IPPROTO_TCP, TCP_CORK, &on, sizeof on);
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
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    link_t l;
    link_plain(&l, c->fd);
    int tls_ok = !s->tls || accept_tls(s, &l) == 0;
    if (idx && tls_ok && read_hello(s, &l, &hello, sizeof hello) == 0 &&
        memcmp(hello.magic, CHAN_MAGIC, 8) == 0)
        ex = server_export_for(s, c, hello.token, hello.kind & 0xff);
    __atomic_store_n(&c->hello_done, 1, __ATOMIC_RELEASE);
    if (!ex && tls_ok) {
        reply.status = CHAN_DENIED;
        __atomic_add_fetch(&s->refused, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->refused_token, 1, __ATOMIC_RELAXED);
    }
    uint8_t *raw = NULL, *packed = NULL;
    if (ex && (hello.kind & CHAN_ZSTD) && zstd_compress_fn)
        packed = malloc(ex->chunk_size + 4096);
    if (ex && (packed || l.ssl))
        raw = malloc(sizeof(chan_answer_t) + ex->chunk_size);
    if (tls_ok && link_write(&l, &reply, sizeof reply) == 0 && ex) {
        rt_budget_t budget = {0};
        if ((hello.kind & 0xff) != CHAN_KIND_URGENT)
            bulk_priority();
        else
            budget = urgent_priority(1);
        for (;;) {
            uint32_t head[2];
            if (link_read(&l, head, sizeof head) < 0 || head[0] == 0 ||
                head[0] > CHAN_MAX_REQ || link_read(&l, idx, head[0] * 8) < 0)
                break;
            int rc = 0;
            tls_cork(c, &l, 1);
            for (uint32_t i = 0; i < head[0] && rc == 0; i++)
                rc = send_chunk(s, c, &l, idx[i], raw, packed);
            tls_cork(c, &l, 0);
            if (rc != 0)
                break; /* a refusal answer was sent, or the peer went away */
            rt_budget_check(&budget);
        }
    }
    free(idx);
    free(raw);
    free(packed);
    link_release(&l);
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

/* Under mTLS: the server's TLS context and the --peer-allow patterns. */
static int server_tls(DataServer *s, const char *cert, const char *key, const char *ca,
                      PyObject *allow)
{
    if (!cert && !key && !ca)
        return 0;
    char err[256];
    if (!cert || !key || !ca || !(s->tls = tls_context(1, cert, key, ca, err, sizeof err))) {
        PyErr_Format(PyExc_ValueError, "native data channel: %s",
                     cert && key && ca ? err : "TLS needs a certificate, a key and a CA");
        return -1;
    }
    PyObject *seq = PySequence_Fast(allow, "allow must be a sequence of str");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    s->allow = calloc((size_t)n + 1, sizeof *s->allow);
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *pat = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
        if (!pat) {
            Py_DECREF(seq);
            return -1;
        }
        s->allow[s->nallow++] = strdup(pat);
    }
    Py_DECREF(seq);
    return 0;
}

static int DataServer_init(DataServer *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host", "port", "tls_cert", "tls_key", "tls_ca", "allow", NULL};
    const char *host, *cert = NULL, *key = NULL, *ca = NULL;
    int port;
    PyObject *allow = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "si|zzzO", kwlist, &host, &port, &cert, &key,
                                     &ca, &allow))
        return -1;
    if (s->running || s->tls) {
        PyErr_SetString(PyExc_RuntimeError, "DataServer already started");
        return -1;
    }
    PyObject *no_patterns = allow ? NULL : PyTuple_New(0);
    int tls_rc = server_tls(s, cert, key, ca, allow ? allow : no_patterns);
    Py_XDECREF(no_patterns);
    if (tls_rc < 0)
        return -1;
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
    SSL_CTX_free(s->tls);
    for (int i = 0; i < s->nallow; i++)
        free(s->allow[i]);
    free(s->allow);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

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
    g->left[CHAN_KIND_URGENT] = 1, g->left[CHAN_KIND_BULK] = BULK_CONNS;
    g->left[CHAN_KIND_STAGE] = 1;
    g->session = calloc(1, sizeof *g->session);
    g->session->refs = 1;
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
        "{sKsKsKsKsKsisisi}", "refused_tls",
        (unsigned long long)__atomic_load_n(&s->refused_tls, __ATOMIC_RELAXED), "refused_busy",
        (unsigned long long)__atomic_load_n(&s->refused_busy, __ATOMIC_RELAXED), "refused_token",
        (unsigned long long)__atomic_load_n(&s->refused_token, __ATOMIC_RELAXED),
        "hello_timeouts",
        (unsigned long long)__atomic_load_n(&s->hello_timeouts, __ATOMIC_RELAXED), "evicted",
        (unsigned long long)__atomic_load_n(&s->evicted, __ATOMIC_RELAXED), "connections", conns,
        "grants", grants, "exports", exports);
}

static PyObject *DataServer_stats(DataServer *s, PyObject *unused)
{
    return Py_BuildValue("{sKsKsKsK}", "bytes_sent",
                         (unsigned long long)__atomic_load_n(&s->bytes_sent, __ATOMIC_RELAXED),
                         "chunks_skipped",
                         (unsigned long long)__atomic_load_n(&s->chunks_skipped, __ATOMIC_RELAXED),
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

PyTypeObject DataServerType = {
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
