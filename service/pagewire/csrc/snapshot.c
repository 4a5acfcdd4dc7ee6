/*
 * Live snapshots by write-protect: stop the writer, write-protect, copy in the
 * background, copy a page before its write.
 */
#include "uffd.h"

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
        ioctl(s->uffd, UFFDIO_WAKE, &rg); /* a fault queued after the kernel's own wake */
        snap_faults(s);
        fsync(s->out_fd);
        s->state = E_COMPLETED;
    }
    if (s->state == E_FAILED) { /* never leave the writer blocked: lift every protection */
        struct uffdio_writeprotect wp = {.range = {s->base, s->size}, .mode = 0};
        ioctl(s->uffd, UFFDIO_WRITEPROTECT, &wp);
        struct uffdio_range rg = {s->base, s->size};
        ioctl(s->uffd, UFFDIO_UNREGISTER, &rg);
        ioctl(s->uffd, UFFDIO_WAKE, &rg);
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

PyTypeObject SnapshotType = {
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
