/*
 * Staging a recorded working set over the native channel before the workload attaches.
 *
 * At session creation there is no engine yet (it needs the workload's uffd), so the chunks
 * are fetched into one buffer on a connection of their own ("stage", the grant's third
 * kind), verified as the engine verifies, and handed to Python, which installs them
 * before the engine serves its first fault. Over gRPC the same set took 80-120 ms for
 * 23 MiB, longer than a workload takes to start; here it is the channel's bulk rate.
 * One request of at most CHAN_MAX_REQ chunks, so the source never waits for us to read
 * while we write; the whole fetch ends within STAGE_DEADLINE_NS (plus one read's timeout).
 */
#include "uffd.h"

#define STAGE_DEADLINE_NS (10ULL * 1000000000ULL)

typedef struct {
    uint64_t *want, *got; /* asked for, in order; received (a skipped chunk is not) */
    uint64_t nwant, ngot;
    uint8_t *out; /* chunk got[i] at out + i * chunk_size, zero-padded to it */
    char why[256];
} stage_t;

/* Ask for every chunk, then read the answers in order; stops at the first error, keeping
 * what came before it. */
static void stage_run(struct chan *c, link_t *l, stage_t *st, uint8_t *scratch)
{
    uint32_t head[2] = {(uint32_t)st->nwant, 0};
    if (link_write(l, head, sizeof head) < 0 || link_write(l, st->want, st->nwant * 8) < 0) {
        snprintf(st->why, sizeof st->why, "request failed");
        return;
    }
    uint64_t deadline = now_ns() + STAGE_DEADLINE_NS;
    for (uint64_t i = 0; i < st->nwant; i++) {
        uint64_t len = 0;
        const char *why = NULL;
        uint8_t *slot = st->out + st->ngot * c->chunk_size;
        int64_t index = chan_receive(c, l, slot, scratch, &len, &why);
        if (index < 0 || (uint64_t)index != st->want[i]) {
            snprintf(st->why, sizeof st->why, "%s", index < 0 ? why : "answer out of order");
            return;
        }
        if (len) { /* else skipped: the session's urgent connection sent it */
            memset(slot + len, 0, c->chunk_size - len); /* a short last chunk */
            st->got[st->ngot++] = (uint64_t)index;
        }
        if (now_ns() > deadline) {
            snprintf(st->why, sizeof st->why, "took longer than %llu s",
                     STAGE_DEADLINE_NS / 1000000000ULL);
            return;
        }
    }
}

/* The export's description (checked as attach_channel checks it); 0, or -1 with why set. */
static int stage_desc(struct chan *c, uint64_t cs, uint64_t size, uint64_t eps, Py_buffer *zm,
                      Py_buffer *dg, Py_buffer *fd, char *why, size_t n)
{
    if (!chan_desc_ok(cs, size, eps, zm, dg, fd->buf ? fd : NULL)) {
        snprintf(why, n, "bad channel description");
        return -1;
    }
    c->chunk_size = cs, c->export_size = size, c->export_ps = eps;
    c->nchunks = (size + cs - 1) / cs;
    c->zmap = zm->buf, c->digests = dg->buf; /* borrowed for the call */
    c->fast = fd->buf && fd->len ? fd->buf : NULL;
    return 0;
}

/* The chunks asked for, copied (a memoryview may be unaligned); 0, or -1 with why set. */
static int stage_want(stage_t *st, Py_buffer *want, uint64_t nchunks)
{
    st->nwant = (uint64_t)want->len / 8;
    if (want->len % 8 || st->nwant > CHAN_MAX_REQ) {
        snprintf(st->why, sizeof st->why, "at most %d chunks, as uint64 indexes", CHAN_MAX_REQ);
        return -1;
    }
    st->want = malloc(st->nwant * 8 + 8);
    st->got = malloc(st->nwant * 8 + 8);
    if (!st->want || !st->got)
        return -1;
    memcpy(st->want, want->buf, st->nwant * 8);
    for (uint64_t i = 0; i < st->nwant; i++)
        if (st->want[i] >= nchunks) {
            snprintf(st->why, sizeof st->why, "chunk index out of range");
            return -1;
        }
    return 0;
}

/* Connect on the stage kind and fetch; the GIL is released throughout. */
static void stage_fetch(struct chan *c, stage_t *st, const char *host, int port,
                        const uint8_t *token, const char *cert, const char *key, const char *ca,
                        uint8_t *scratch)
{
    SSL_CTX *tls = NULL;
    if (cert && !(tls = tls_context(0, cert, key, ca, st->why, sizeof st->why)))
        return;
    link_t l;
    if (chan_connect(&l, host, port, token, CHAN_KIND_STAGE, tls, st->why, sizeof st->why) ==
        0) {
        stage_run(c, &l, st, scratch);
        link_close(&l);
    }
    SSL_CTX_free(tls);
}

PyObject *mod_stage_chunks(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host",     "port",    "token",        "chunk_size", "export_size",
                             "export_page_size", "zero_map", "digests", "chunks",
                             "fast_digests", "tls_cert", "tls_key", "tls_ca", NULL};
    const char *host, *cert = NULL, *key = NULL, *ca = NULL;
    int port;
    unsigned long long cs, size, eps;
    Py_buffer tok, zm, dg, want, fd = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "siy*KKKy*y*y*|z*zzz", kwlist, &host, &port,
                                     &tok, &cs, &size, &eps, &zm, &dg, &want, &fd, &cert, &key,
                                     &ca))
        return NULL;
    PyObject *result = NULL, *data = NULL, *got = NULL;
    stage_t st = {0};
    struct chan c = {0};
    uint8_t *scratch = NULL;
    if (tok.len != 16 || (cert || key || ca) != (cert && key && ca))
        snprintf(st.why, sizeof st.why, "a 16-byte token, and all three TLS files or none");
    else if (stage_desc(&c, cs, size, eps, &zm, &dg, &fd, st.why, sizeof st.why) == 0 &&
             stage_want(&st, &want, c.nchunks) < 0 && !st.why[0]) {
        PyErr_NoMemory();
        goto out;
    }
    if (st.why[0]) {
        PyErr_Format(PyExc_ValueError, "stage_chunks: %s", st.why);
        goto out;
    }
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(st.nwant * cs));
    scratch = malloc(cs);
    if (!data || !scratch) {
        PyErr_NoMemory();
        goto out;
    }
    st.out = (uint8_t *)PyBytes_AS_STRING(data); /* ours alone until returned */
    if (st.nwant) {
        Py_BEGIN_ALLOW_THREADS;
        stage_fetch(&c, &st, host, port, tok.buf, cert, key, ca, scratch);
        Py_END_ALLOW_THREADS;
    }
    got = PyBytes_FromStringAndSize((const char *)st.got, (Py_ssize_t)(st.ngot * 8));
    Py_ssize_t keep = (Py_ssize_t)(st.ngot * cs); /* (an empty bytes is shared: no resize) */
    if (got && (PyBytes_GET_SIZE(data) == keep || _PyBytes_Resize(&data, keep) == 0))
        result = Py_BuildValue("(OOsK)", got, data, st.why[0] ? st.why : NULL,
                               (unsigned long long)c.bytes_received);
out:
    Py_XDECREF(got);
    Py_XDECREF(data);
    free(scratch);
    free(st.want);
    free(st.got);
    PyBuffer_Release(&tok);
    PyBuffer_Release(&zm);
    PyBuffer_Release(&dg);
    PyBuffer_Release(&want);
    if (fd.buf)
        PyBuffer_Release(&fd);
    return result;
}
