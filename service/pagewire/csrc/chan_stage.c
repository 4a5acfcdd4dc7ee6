/*
 * Staging a recorded working set over the native channel before the workload attaches.
 *
 * At session creation there is no engine yet (it needs the workload's uffd), so the chunks
 * are fetched into one buffer on a connection of their own ("stage", the grant's third
 * kind), verified as the engine verifies, and handed to Python, which installs them
 * before the engine serves its first fault. Over gRPC the same set took 80-120 ms for
 * 23 MiB, longer than a workload takes to start; here it is the channel's bulk rate.
 */
#include "uffd.h"

typedef struct {
    uint64_t *want, *got; /* asked for, in order; received (a skipped chunk is not) */
    uint64_t nwant, ngot;
    uint8_t *out; /* chunk got[i] at out + i * chunk_size */
    char why[256];
} stage_t;

/* Ask for every chunk, then read the answers in order; stops at the first error, keeping
 * what came before it. */
static void stage_run(struct chan *c, link_t *l, stage_t *st, uint8_t *stage)
{
    for (uint64_t i = 0; i < st->nwant; i += CHAN_MAX_REQ) {
        uint64_t n = st->nwant - i < CHAN_MAX_REQ ? st->nwant - i : CHAN_MAX_REQ;
        uint32_t head[2] = {(uint32_t)n, 0};
        if (link_write(l, head, sizeof head) < 0 || link_write(l, st->want + i, n * 8) < 0) {
            snprintf(st->why, sizeof st->why, "request failed");
            return;
        }
    }
    for (uint64_t i = 0; i < st->nwant; i++) {
        uint64_t len = 0;
        const char *why = NULL;
        int64_t index = chan_receive(c, l, st->out + st->ngot * c->chunk_size, stage, &len,
                                     &why);
        if (index < 0 || (uint64_t)index != st->want[i]) {
            snprintf(st->why, sizeof st->why, "%s", index < 0 ? why : "answer out of order");
            return;
        }
        if (len) /* else skipped: the session's urgent connection sent it */
            st->got[st->ngot++] = (uint64_t)index;
    }
}

/* The description of the export the answers are checked against, as attach_channel
 * takes it; NULL (with why set) when it does not hold together. */
static struct chan *stage_chan(uint64_t cs, uint64_t size, uint64_t eps, Py_buffer *zm,
                               Py_buffer *dg, Py_buffer *fd, char *why, size_t n)
{
    uint64_t nchunks = cs ? (size + cs - 1) / cs : 0;
    if (eps == 0 || cs == 0 || cs % eps || size % eps || (uint64_t)zm->len != size / eps ||
        (uint64_t)dg->len != nchunks * 32 || (fd->buf && (uint64_t)fd->len != nchunks * 16)) {
        snprintf(why, n, "bad channel description");
        return NULL;
    }
    struct chan *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->chunk_size = cs, c->export_size = size, c->export_ps = eps, c->nchunks = nchunks;
    c->zmap = zm->buf, c->digests = dg->buf; /* borrowed for the call */
    c->fast = fd->buf && fd->len ? fd->buf : NULL;
    return c;
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
    PyObject *result = NULL, *data = NULL;
    stage_t st = {0};
    struct chan *c = stage_chan(cs, size, eps, &zm, &dg, &fd, st.why, sizeof st.why);
    st.nwant = (uint64_t)want.len / 8;
    for (uint64_t i = 0; c && i < st.nwant; i++)
        if (((uint64_t *)want.buf)[i] >= c->nchunks)
            snprintf(st.why, sizeof st.why, "chunk index out of range");
    if (!c || st.why[0] || tok.len != 16 || want.len % 8 || (cert || key || ca) != (cert && key && ca)) {
        PyErr_Format(PyExc_ValueError, "stage_chunks: %s",
                     st.why[0] ? st.why : c ? "bad token, chunk list or TLS files" : "no memory");
        goto out;
    }
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(st.nwant * cs));
    st.want = want.buf;
    st.got = malloc(st.nwant * 8 + 8);
    uint8_t *stage = malloc(cs);
    if (!data || !st.got || !stage) {
        free(stage);
        PyErr_NoMemory();
        goto out;
    }
    st.out = (uint8_t *)PyBytes_AS_STRING(data); /* ours alone until returned */
    Py_BEGIN_ALLOW_THREADS SSL_CTX *tls = cert ? tls_context(0, cert, key, ca, st.why,
                                                             sizeof st.why)
                                               : NULL;
    link_t l;
    if ((!cert || tls) &&
        chan_connect(&l, host, port, tok.buf, CHAN_KIND_STAGE, tls, st.why, sizeof st.why) == 0) {
        stage_run(c, &l, &st, stage);
        link_close(&l);
    }
    SSL_CTX_free(tls);
    Py_END_ALLOW_THREADS free(stage);
    PyObject *got = PyBytes_FromStringAndSize((const char *)st.got, (Py_ssize_t)(st.ngot * 8));
    if (got && _PyBytes_Resize(&data, (Py_ssize_t)(st.ngot * cs)) == 0) {
        result = Py_BuildValue("(OOs)", got, data, st.why[0] ? st.why : NULL);
    }
    Py_XDECREF(got);
out:
    Py_XDECREF(data);
    free(st.got);
    free(c);
    PyBuffer_Release(&tok);
    PyBuffer_Release(&zm);
    PyBuffer_Release(&dg);
    PyBuffer_Release(&want);
    if (fd.buf)
        PyBuffer_Release(&fd);
    return result;
}
