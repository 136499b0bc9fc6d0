/* The thin CPython binding of the bitshard C core.
 *
 * It checks arguments, holds buffers for as long as C keeps pointers into
 * them, releases the GIL around every long C call, and maps C status codes
 * to the exception classes of bitshard.errors (kept in module state).
 * Arrays cross as buffers: inputs are read-only C-contiguous buffers of the
 * exact dtype (never converted silently), outputs are writable buffers the
 * Python side allocates with numpy. Every entry point takes its buffers
 * through one table (buf_arg, bufs_acquire, bufs_release) and its integers
 * through one range-checked reader (int_arg): no value wraps on its way to
 * C, and a value outside a C parameter's range is InvalidInputError naming
 * the argument and the value.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bitshard.h"

/* The module's types, in the order of native_exec's specs. */
enum { ROTATION_TYPE, BUILDER_TYPE, SEGMENT_TYPE, SEARCHER_TYPE, ONE_SEARCH_TYPE, NUM_TYPES };

typedef struct {
    PyObject *errors[10]; /* indexed by bs_status */
    PyTypeObject *types[NUM_TYPES];
} native_state;

static native_state *get_state(PyObject *module) {
    return (native_state *)PyModule_GetState(module);
}

static PyObject *raise_bs(PyObject *module, const bs_error *err) {
    native_state *st = get_state(module);
    PyObject *cls = NULL;
    if (err->code >= 0 && (int)err->code < 10) cls = st->errors[err->code];
    if (cls == NULL) cls = PyExc_RuntimeError;
    if (err->code == BS_ERR_NO_MEMORY) return PyErr_NoMemory();
    PyErr_SetString(cls, err->message[0] ? err->message : bs_status_name(err->code));
    return NULL;
}

/* bitshard.errors.InvalidInputError, for arguments refused here. */
static PyObject *invalid_input(PyObject *module) {
    PyObject *cls = get_state(module)->errors[BS_ERR_INVALID_ARGUMENT];
    return cls != NULL ? cls : PyExc_ValueError;
}

/* ------------------------------------------------------ integer arguments */

/* Reads obj as an integer in [lo, hi]. The "I" and "K" formats of
 * PyArg_ParseTuple keep the low bits of a larger value (nprobes=2**32+1
 * became 1), so every integer argument comes through here instead: a value
 * outside the range, however large, is InvalidInputError naming the
 * argument and the value; a non-integer is TypeError. */
static int int_arg(PyObject *module, PyObject *obj, const char *name, unsigned long long lo,
                   unsigned long long hi, unsigned long long *out) {
    PyObject *v = PyNumber_Index(obj);
    if (v == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must be an integer, got %.100s", name,
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    int overflow;
    long long s = PyLong_AsLongLongAndOverflow(v, &overflow);
    unsigned long long u = 0;
    int ok = 0;
    if (overflow == 0 && s == -1 && PyErr_Occurred()) {
        Py_DECREF(v);
        return -1;
    }
    if (overflow == 0 && s >= 0) {
        u = (unsigned long long)s;
        ok = 1;
    } else if (overflow > 0) { /* above LLONG_MAX: may still fit 64 unsigned bits */
        u = PyLong_AsUnsignedLongLong(v);
        ok = !(u == (unsigned long long)-1 && PyErr_Occurred());
        if (!ok) PyErr_Clear();
    }
    if (!ok || u < lo || u > hi) {
        PyErr_Format(invalid_input(module), "%s must be an integer in [%llu, %llu], got %R",
                     name, lo, hi, v);
        Py_DECREF(v);
        return -1;
    }
    Py_DECREF(v);
    *out = u;
    return 0;
}

/* A uint32_t parameter of the C API, at least lo. */
static int u32_arg(PyObject *module, PyObject *obj, const char *name, uint32_t lo,
                   uint32_t *out) {
    unsigned long long v;
    if (int_arg(module, obj, name, lo, UINT32_MAX, &v) < 0) return -1;
    *out = (uint32_t)v;
    return 0;
}

/* A row or query count: a size_t that numpy could also index. */
static int count_arg(PyObject *module, PyObject *obj, const char *name, size_t *out) {
    unsigned long long v;
    if (int_arg(module, obj, name, 0, PY_SSIZE_T_MAX, &v) < 0) return -1;
    *out = (size_t)v;
    return 0;
}

/* A C enum (metric, rotation kind): any int-sized value; the library
 * refuses the ones it does not know, with its own message. */
static int enum_arg(PyObject *module, PyObject *obj, const char *name, int *out) {
    unsigned long long v;
    if (int_arg(module, obj, name, 0, INT_MAX, &v) < 0) return -1;
    *out = (int)v;
    return 0;
}

/* a * b items, or SIZE_MAX (more than any buffer holds) on overflow. */
static size_t items_of(size_t a, size_t b) {
    return b != 0 && a > SIZE_MAX / b ? SIZE_MAX : a * b;
}

/* ------------------------------------------------------ buffer arguments */

enum {
    BUF_WRITABLE = 1, /* an output */
    BUF_OPTIONAL = 2, /* None leaves it unheld */
    BUF_EXACT = 4     /* need is the exact item count, not the minimum */
};

/* One buffer argument of an entry point: the caller fills name, obj, kind,
 * flags and need; bufs_acquire fills view and held. */
typedef struct {
    const char *name;
    PyObject *obj;
    char kind;      /* 'f' float32, 'u' uint32, 'U' uint64, 'b' any bytes */
    unsigned flags; /* BUF_* */
    size_t need;    /* items it must hold */
    Py_buffer view;
    int held;
} buf_arg;

/* Takes obj's buffer, C-contiguous, of the kind's element type. */
static int get_buf(PyObject *obj, Py_buffer *view, char kind, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    if (kind == 'b') return 0;
    const char *fmt = view->format ? view->format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    Py_ssize_t itemsize = kind == 'U' ? 8 : 4;
    int ok;
    if (kind == 'f')
        ok = view->itemsize == 4 && strcmp(fmt, "f") == 0;
    else
        ok = view->itemsize == itemsize && fmt[0] != '\0' && fmt[1] == '\0' &&
             strchr("BHILQN", fmt[0]) != NULL;
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must hold %s, got format '%s' of %zd bytes", name,
                     kind == 'f' ? "float32" : (kind == 'U' ? "uint64" : "uint32"),
                     view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static size_t buf_items(const Py_buffer *view) {
    return (size_t)(view->len / (view->itemsize ? view->itemsize : 1));
}

static int check_len(PyObject *module, const Py_buffer *view, size_t items, int exact,
                     const char *name) {
    size_t have = buf_items(view);
    if (have < items || (exact && have != items)) {
        PyErr_Format(invalid_input(module), "%s holds %zu items, needs %s%zu", name, have,
                     exact ? "" : "at least ", items);
        return -1;
    }
    return 0;
}

static void bufs_release(buf_arg *t, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (t[i].held) PyBuffer_Release(&t[i].view);
        t[i].held = 0;
    }
}

/* Takes every buffer of the table and checks its length: all or nothing
 * (on failure, what was taken is released). An entry point calls
 * bufs_release on its one exit path after a success. */
static int bufs_acquire(PyObject *module, buf_arg *t, size_t n) {
    for (size_t i = 0; i < n; i++) {
        t[i].held = 0;
        if ((t[i].flags & BUF_OPTIONAL) && (t[i].obj == NULL || t[i].obj == Py_None))
            continue;
        if (get_buf(t[i].obj, &t[i].view, t[i].kind, t[i].flags & BUF_WRITABLE, t[i].name) < 0)
            goto fail;
        t[i].held = 1;
        if (check_len(module, &t[i].view, t[i].need, t[i].flags & BUF_EXACT, t[i].name) < 0)
            goto fail;
    }
    return 0;
fail:
    bufs_release(t, n);
    return -1;
}

/* A table entry (designated, so view and held start zeroed). */
#define BUF(name_, obj_, kind_, flags_, need_) \
    {.name = (name_), .obj = (obj_), .kind = (kind_), .flags = (flags_), .need = (need_)}

#define NBUFS(t) (sizeof(t) / sizeof((t)[0]))

/* The held buffer's memory, or NULL for an optional one passed as None. */
static void *buf_ptr(const buf_arg *b) { return b->held ? b->view.buf : NULL; }

/* The end of an entry point that returns None: releases its buffers, then
 * None or the library's error. */
static PyObject *finish(PyObject *module, buf_arg *t, size_t n, bs_status status,
                        const bs_error *err) {
    bufs_release(t, n);
    if (status != BS_OK) return raise_bs(module, err);
    Py_RETURN_NONE;
}

static PyObject *fingerprint_bytes(bs_fingerprint fp) {
    return PyBytes_FromStringAndSize((const char *)fp.bytes, 16);
}

/* The end of a tp_init after the library call: 0, or -1 with its error. */
static int init_result(PyObject *module, bs_status status, const bs_error *err) {
    if (status == BS_OK) return 0;
    raise_bs(module, err);
    return -1;
}

/* The end of every tp_dealloc, once the library's object is freed. */
static void dealloc_object(PyObject *self, PyObject *module) {
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(module);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* ------------------------------------------------------------- Rotation */

typedef struct {
    PyObject_HEAD
    bs_rotation *rot;
    PyObject *module;
} RotationObject;

static int Rotation_init(RotationObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"kind", "dim", "seed", NULL};
    PyObject *kind_o, *dim_o, *seed_o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO", kwlist, &kind_o, &dim_o, &seed_o))
        return -1;
    int kind;
    uint32_t dim;
    unsigned long long seed;
    if (enum_arg(self->module, kind_o, "kind", &kind) < 0 ||
        u32_arg(self->module, dim_o, "dim", 0, &dim) < 0 ||
        int_arg(self->module, seed_o, "seed", 0, UINT64_MAX, &seed) < 0)
        return -1;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_rotation_create((bs_rotation_kind)kind, dim, seed, &self->rot, &err);
    Py_END_ALLOW_THREADS
    return init_result(self->module, status, &err);
}

static void Rotation_dealloc(RotationObject *self) {
    bs_rotation_free(self->rot);
    dealloc_object((PyObject *)self, self->module);
}

static PyObject *Rotation_apply(RotationObject *self, PyObject *args) {
    PyObject *xo, *n_o, *in_dim_o, *outo;
    if (!PyArg_ParseTuple(args, "OOOO", &xo, &n_o, &in_dim_o, &outo)) return NULL;
    size_t n;
    uint32_t in_dim;
    if (count_arg(self->module, n_o, "n", &n) < 0 ||
        u32_arg(self->module, in_dim_o, "in_dim", 0, &in_dim) < 0)
        return NULL;
    buf_arg b[] = {
        BUF("x", xo, 'f', 0, items_of(n, in_dim)),
        BUF("out", outo, 'f', BUF_WRITABLE, items_of(n, bs_rotation_padded_dim(self->rot))),
    };
    if (bufs_acquire(self->module, b, NBUFS(b)) < 0) return NULL;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_rotation_apply(self->rot, b[0].view.buf, n, in_dim, b[1].view.buf, &err);
    Py_END_ALLOW_THREADS
    return finish(self->module, b, NBUFS(b), status, &err);
}

static PyObject *Rotation_get_padded_dim(RotationObject *self, void *c) {
    return PyLong_FromUnsignedLong(bs_rotation_padded_dim(self->rot));
}
static PyObject *Rotation_get_fingerprint(RotationObject *self, void *c) {
    return fingerprint_bytes(bs_rotation_fingerprint(self->rot));
}

static PyMethodDef Rotation_methods[] = {
    {"apply", (PyCFunction)Rotation_apply, METH_VARARGS,
     "apply(x, n, in_dim, out): rotate n rows of in_dim float32 into out (n x padded_dim)."},
    {NULL, NULL, 0, NULL}};
static PyGetSetDef Rotation_getset[] = {
    {"padded_dim", (getter)Rotation_get_padded_dim, NULL, "padded dimension D", NULL},
    {"fingerprint", (getter)Rotation_get_fingerprint, NULL, "16-byte fingerprint", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

/* OpenBLAS's thread count (the library carried by scipy-openblas32). */
extern void scipy_openblas_set_num_threads(int num_threads);
extern int scipy_openblas_get_num_threads(void);

/* Before a library call on `threads` threads of our own, each running the
 * BLAS on its own rows: the BLAS's pool would only spin against them (see
 * bs_kmeans_train_mt), so it runs single-threaded meanwhile. The count is
 * process-wide; another thread's call in between is merely slower, never
 * wrong. Returns what blas_restore puts back. */
static int blas_single(unsigned threads) {
    int blas = threads > 1 ? scipy_openblas_get_num_threads() : 0;
    if (blas > 1) scipy_openblas_set_num_threads(1);
    return blas;
}

static void blas_restore(int blas) {
    if (blas > 1) scipy_openblas_set_num_threads(blas);
}

/* --------------------------------------------------------------- Builder */

typedef struct {
    PyObject_HEAD
    bs_segment_builder *b;
    PyObject *module;
    unsigned int threads;
    uint32_t dim; /* of the rows add() takes */
} BuilderObject;

static int Builder_init(BuilderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dim", "num_bits", "metric", "rotation_kind", "rotation_seed",
                             "centroids", "num_partitions", "column", "uuid",
                             "fragment_ids", "fragment_rows", NULL};
    PyObject *dim_o, *bits_o, *metric_o, *kind_o, *seed_o, *nlist_o;
    PyObject *co, *uuido, *fido, *frowo;
    const char *column;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOsOOO", kwlist, &dim_o, &bits_o,
                                     &metric_o, &kind_o, &seed_o, &co, &nlist_o, &column,
                                     &uuido, &fido, &frowo))
        return -1;
    PyObject *m = self->module;
    uint32_t dim, bits, num_partitions;
    int metric, kind;
    unsigned long long seed;
    if (u32_arg(m, dim_o, "dim", 0, &dim) < 0 || u32_arg(m, bits_o, "num_bits", 0, &bits) < 0 ||
        enum_arg(m, metric_o, "metric", &metric) < 0 ||
        enum_arg(m, kind_o, "rotation_kind", &kind) < 0 ||
        int_arg(m, seed_o, "rotation_seed", 0, UINT64_MAX, &seed) < 0 ||
        u32_arg(m, nlist_o, "num_partitions", 0, &num_partitions) < 0)
        return -1;
    buf_arg b[] = {
        BUF("centroids", co, 'f', 0, items_of(num_partitions, dim)),
        BUF("uuid", uuido, 'b', BUF_EXACT, 16),
        BUF("fragment_ids", fido, 'U', 0, 0),
        BUF("fragment_rows", frowo, 'U', 0, 0),
    };
    if (bufs_acquire(m, b, NBUFS(b)) < 0) return -1;
    size_t num_fragments = buf_items(&b[2].view);
    int rc = -1;
    if (num_fragments > UINT32_MAX) {
        PyErr_Format(invalid_input(m), "fragment_ids holds %zu items, at most %u",
                     num_fragments, (unsigned)UINT32_MAX);
    } else if (check_len(m, &b[3].view, num_fragments, 0, "fragment_rows") == 0) {
        bs_segment_spec spec;
        memset(&spec, 0, sizeof spec);
        spec.dim = dim;
        spec.num_bits = bits;
        spec.metric = (bs_metric)metric;
        spec.rotation_kind = (bs_rotation_kind)kind;
        spec.rotation_seed = seed;
        spec.centroids = b[0].view.buf;
        spec.num_partitions = num_partitions;
        spec.column = column;
        spec.uuid = b[1].view.buf;
        spec.fragment_ids = b[2].view.buf;
        spec.fragment_rows = b[3].view.buf;
        spec.num_fragments = (uint32_t)num_fragments;
        bs_error err;
        bs_status status;
        Py_BEGIN_ALLOW_THREADS
        status = bs_builder_create(&spec, &self->b, &err);
        Py_END_ALLOW_THREADS
        self->threads = 1;
        self->dim = dim;
        if (status != BS_OK)
            raise_bs(m, &err);
        else
            rc = 0;
    }
    bufs_release(b, NBUFS(b));
    return rc;
}

static void Builder_dealloc(BuilderObject *self) {
    bs_builder_free(self->b);
    dealloc_object((PyObject *)self, self->module);
}

static PyObject *Builder_add(BuilderObject *self, PyObject *args) {
    PyObject *xo, *n_o, *dim_o, *fidx_o, *offo;
    if (!PyArg_ParseTuple(args, "OOOOO", &xo, &n_o, &dim_o, &fidx_o, &offo)) return NULL;
    PyObject *m = self->module;
    size_t n;
    uint32_t dim, fidx;
    if (count_arg(m, n_o, "n", &n) < 0 || u32_arg(m, dim_o, "dim", 0, &dim) < 0 ||
        u32_arg(m, fidx_o, "fragment_index", 0, &fidx) < 0)
        return NULL;
    /* The library reads n rows of the builder's dimension: a smaller dim
     * here would let a short buffer pass the length check. */
    if (dim != self->dim)
        return PyErr_Format(invalid_input(m), "dim is %u, the builder's rows have %u", dim,
                            self->dim);
    buf_arg b[] = {
        BUF("x", xo, 'f', 0, items_of(n, dim)),
        BUF("offsets", offo, 'u', 0, n),
    };
    if (bufs_acquire(m, b, NBUFS(b)) < 0) return NULL;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    int blas = blas_single(self->threads);
    status = bs_builder_add(self->b, b[0].view.buf, n, fidx, b[1].view.buf, &err);
    blas_restore(blas);
    Py_END_ALLOW_THREADS
    return finish(m, b, NBUFS(b), status, &err);
}

static PyObject *Builder_write(BuilderObject *self, PyObject *args) {
    const char *path;
    PyObject *flags_o = NULL;
    if (!PyArg_ParseTuple(args, "s|O", &path, &flags_o)) return NULL;
    uint32_t flags = 0;
    if (flags_o != NULL && u32_arg(self->module, flags_o, "flags", 0, &flags) < 0)
        return NULL;
    bs_error err;
    bs_status status = bs_builder_set_write_flags(self->b, flags, &err);
    if (status != BS_OK) return raise_bs(self->module, &err);
    Py_BEGIN_ALLOW_THREADS
    status = bs_builder_write(self->b, path, &err);
    Py_END_ALLOW_THREADS
    if (status != BS_OK) return raise_bs(self->module, &err);
    Py_RETURN_NONE;
}

static PyObject *Builder_set_threads(BuilderObject *self, PyObject *args) {
    PyObject *n_o;
    uint32_t n;
    if (!PyArg_ParseTuple(args, "O", &n_o)) return NULL;
    if (u32_arg(self->module, n_o, "threads", 1, &n) < 0) return NULL;
    bs_builder_set_threads(self->b, n);
    self->threads = n;
    Py_RETURN_NONE;
}

static PyObject *Builder_set_fragment_identity(BuilderObject *self, PyObject *args) {
    PyObject *id_o, *fpo;
    if (!PyArg_ParseTuple(args, "OO", &id_o, &fpo)) return NULL;
    PyObject *m = self->module;
    unsigned long long id;
    if (int_arg(m, id_o, "fragment_id", 0, UINT64_MAX, &id) < 0) return NULL;
    buf_arg b[] = {BUF("fingerprint", fpo, 'b', BUF_EXACT, 16)};
    if (bufs_acquire(m, b, NBUFS(b)) < 0) return NULL;
    bs_error err;
    bs_status status = bs_builder_set_fragment_identity(self->b, id, b[0].view.buf, &err);
    return finish(m, b, NBUFS(b), status, &err);
}

static PyMethodDef Builder_methods[] = {
    {"set_fragment_identity", (PyCFunction)Builder_set_fragment_identity, METH_VARARGS,
     "set_fragment_identity(fragment_id, fingerprint): record 16 identity bytes."},
    {"set_threads", (PyCFunction)Builder_set_threads, METH_VARARGS,
     "set_threads(n): threads for each later add (same segment for every n)."},
    {"add", (PyCFunction)Builder_add, METH_VARARGS,
     "add(x, n, dim, fragment_index, offsets): encode n float32 rows."},
    {"write", (PyCFunction)Builder_write, METH_VARARGS,
     "write(path, flags=0): write the segment (flags: WRITE_EXTERNAL_CENTROIDS)."},
    {NULL, NULL, 0, NULL}};

/* --------------------------------------------------------------- Segment */

typedef struct {
    PyObject_HEAD
    bs_segment *seg;
    Py_buffer buf; /* held until dealloc: the segment points into it */
    int has_buf;
    /* A prefix open: one buffer per partition, held while attached. */
    Py_buffer *parts;
    unsigned char *has_part;
    uint32_t num_partitions;
    /* The index's centroids (external centroids), held like buf. */
    Py_buffer cent;
    int has_cent;
    PyObject *module;
} SegmentObject;

/* Segment(data): the whole file. Segment(prefix, file_size): the file's
 * prefix (bs_segment_open_prefix); partitions come by attach().
 * centroids=: the index's, for a file with external centroids. */
static int Segment_init(SegmentObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"data", "file_size", "centroids", NULL};
    PyObject *bo, *sizeo = NULL, *co = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OO", kwlist, &bo, &sizeo, &co)) return -1;
    if (sizeo == Py_None) sizeo = NULL;
    unsigned long long file_size = 0;
    if (sizeo != NULL && int_arg(self->module, sizeo, "file_size", 0, SIZE_MAX, &file_size) < 0)
        return -1;
    /* Held past this call (until dealloc), so not through a buf_arg table. */
    if (get_buf(bo, &self->buf, 'b', 0, "data") < 0) return -1;
    self->has_buf = 1;
    const float *cent = NULL;
    size_t ncent = 0;
    if (co != Py_None) {
        if (get_buf(co, &self->cent, 'f', 0, "centroids") < 0) return -1;
        self->has_cent = 1;
        cent = self->cent.buf;
        ncent = buf_items(&self->cent);
    }
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    if (sizeo == NULL)
        status = bs_segment_open_with_centroids(self->buf.buf, (size_t)self->buf.len, cent,
                                                ncent, &self->seg, &err);
    else
        status = bs_segment_open_prefix_with_centroids(self->buf.buf, (size_t)self->buf.len,
                                                       file_size, cent, ncent, &self->seg,
                                                       &err);
    Py_END_ALLOW_THREADS
    if (status == BS_OK && sizeo != NULL) {
        bs_segment_info in;
        bs_segment_get_info(self->seg, &in);
        self->num_partitions = in.num_partitions;
        self->parts = PyMem_Calloc(in.num_partitions, sizeof *self->parts);
        self->has_part = PyMem_Calloc(in.num_partitions, 1);
        if (self->parts == NULL || self->has_part == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return init_result(self->module, status, &err);
}

static void Segment_dealloc(SegmentObject *self) {
    bs_segment_free(self->seg);
    for (uint32_t p = 0; self->has_part != NULL && p < self->num_partitions; p++)
        if (self->has_part[p]) PyBuffer_Release(&self->parts[p]);
    PyMem_Free(self->parts);
    PyMem_Free(self->has_part);
    if (self->has_buf) PyBuffer_Release(&self->buf);
    if (self->has_cent) PyBuffer_Release(&self->cent);
    dealloc_object((PyObject *)self, self->module);
}

/* partition_range(p) -> (offset, size) of partition p's bytes in the file. */
static PyObject *Segment_partition_range(SegmentObject *self, PyObject *args) {
    PyObject *po;
    uint32_t p;
    if (!PyArg_ParseTuple(args, "O", &po) || u32_arg(self->module, po, "partition", 0, &p) < 0)
        return NULL;
    uint64_t off = 0, size = 0;
    bs_error err;
    if (bs_segment_partition_range(self->seg, p, &off, &size, &err) != BS_OK)
        return raise_bs(self->module, &err);
    return Py_BuildValue("(KK)", (unsigned long long)off, (unsigned long long)size);
}

static PyObject *Segment_attached(SegmentObject *self, PyObject *args) {
    PyObject *po;
    uint32_t p;
    if (!PyArg_ParseTuple(args, "O", &po) || u32_arg(self->module, po, "partition", 0, &p) < 0)
        return NULL;
    return PyBool_FromLong(bs_segment_partition_attached(self->seg, p));
}

/* attach(p, data): checks and attaches partition p's bytes (64-byte
 * aligned), holding data until detach or dealloc. */
static PyObject *Segment_attach(SegmentObject *self, PyObject *args) {
    PyObject *po, *bo;
    uint32_t p;
    if (!PyArg_ParseTuple(args, "OO", &po, &bo) ||
        u32_arg(self->module, po, "partition", 0, &p) < 0)
        return NULL;
    Py_buffer view;
    if (get_buf(bo, &view, 'b', 0, "data") < 0) return NULL;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_segment_attach(self->seg, p, view.buf, (size_t)view.len, &err);
    Py_END_ALLOW_THREADS
    if (status != BS_OK) {
        PyBuffer_Release(&view);
        return raise_bs(self->module, &err);
    }
    /* attach succeeds only on a prefix open (parts allocated) and only
     * for an absent partition (no buffer held). */
    self->parts[p] = view;
    self->has_part[p] = 1;
    Py_RETURN_NONE;
}

/* detach(p): partition p absent again, its buffer released. The caller
 * guarantees that no search is using it. */
static PyObject *Segment_detach(SegmentObject *self, PyObject *args) {
    PyObject *po;
    uint32_t p;
    if (!PyArg_ParseTuple(args, "O", &po) || u32_arg(self->module, po, "partition", 0, &p) < 0)
        return NULL;
    bs_error err;
    if (bs_segment_detach(self->seg, p, &err) != BS_OK) return raise_bs(self->module, &err);
    if (self->has_part[p]) PyBuffer_Release(&self->parts[p]);
    self->has_part[p] = 0;
    Py_RETURN_NONE;
}

static PyObject *Segment_info(SegmentObject *self, PyObject *unused) {
    bs_segment_info in;
    bs_segment_get_info(self->seg, &in);
    return Py_BuildValue(
        "{s:I,s:I,s:I,s:I,s:i,s:i,s:K,s:I,s:I,s:K,s:y#,s:N,s:N,s:s,s:O}", "format_version",
        in.format_version, "dim", in.dim, "padded_dim", in.padded_dim, "num_bits",
        in.num_bits, "metric", (int)in.metric, "rotation_kind", (int)in.rotation_kind,
        "rotation_seed", (unsigned long long)in.rotation_seed, "num_partitions",
        in.num_partitions, "num_fragments", in.num_fragments, "num_rows",
        (unsigned long long)in.num_rows, "uuid", (const char *)in.uuid, (Py_ssize_t)16,
        "rotation_fingerprint", fingerprint_bytes(in.rotation_fingerprint),
        "ivf_fingerprint", fingerprint_bytes(in.ivf_fingerprint), "column", in.column,
        "external_centroids", in.external_centroids ? Py_True : Py_False);
}

static PyObject *Segment_fragments(SegmentObject *self, PyObject *unused) {
    bs_segment_info in;
    bs_segment_get_info(self->seg, &in);
    PyObject *list = PyList_New(in.num_fragments);
    if (list == NULL) return NULL;
    for (uint32_t i = 0; i < in.num_fragments; i++) {
        uint64_t id, rows;
        bs_segment_fragment(self->seg, i, &id, &rows);
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)id, (unsigned long long)rows);
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

static PyObject *Segment_fragment_identities(SegmentObject *self, PyObject *unused) {
    bs_segment_info in;
    bs_segment_get_info(self->seg, &in);
    PyObject *list = PyList_New(in.num_fragments);
    if (list == NULL) return NULL;
    for (uint32_t i = 0; i < in.num_fragments; i++) {
        uint8_t fp[16];
        bs_segment_fragment_identity(self->seg, i, fp);
        PyObject *t = PyBytes_FromStringAndSize((const char *)fp, 16);
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

static PyObject *Segment_verify(SegmentObject *self, PyObject *unused) {
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_segment_verify(self->seg, &err);
    Py_END_ALLOW_THREADS
    if (status != BS_OK) return raise_bs(self->module, &err);
    Py_RETURN_NONE;
}

/* set_mapped(): the buffer is a shared read-only file mapping (an mmap of
 * the file), so verify and merge drop its pages once read. */
static PyObject *Segment_set_mapped(SegmentObject *self, PyObject *unused) {
    bs_error err;
    if (bs_segment_set_mapped(self->seg, &err) != BS_OK) return raise_bs(self->module, &err);
    Py_RETURN_NONE;
}

static PyObject *Segment_centroids(SegmentObject *self, PyObject *args) {
    PyObject *outo;
    if (!PyArg_ParseTuple(args, "O", &outo)) return NULL;
    bs_segment_info in;
    bs_segment_get_info(self->seg, &in);
    size_t n = (size_t)in.num_partitions * in.dim;
    buf_arg b[] = {BUF("out", outo, 'f', BUF_WRITABLE, n)};
    if (bufs_acquire(self->module, b, NBUFS(b)) < 0) return NULL;
    memcpy(b[0].view.buf, bs_segment_centroids(self->seg), n * sizeof(float));
    bufs_release(b, NBUFS(b));
    Py_RETURN_NONE;
}

static PyObject *Segment_residual_sum(SegmentObject *self, PyObject *unused) {
    return PyFloat_FromDouble(bs_segment_residual_sum(self->seg));
}

static PyMethodDef Segment_methods[] = {
    {"info", (PyCFunction)Segment_info, METH_NOARGS, "header fields as a dict"},
    {"residual_sum", (PyCFunction)Segment_residual_sum, METH_NOARGS,
     "sum of the rows' residual norms (sqrt of norm2)"},
    {"fragment_identities", (PyCFunction)Segment_fragment_identities, METH_NOARGS,
     "fragment_identities() -> [16-byte identity per fragment table entry]"},
    {"verify", (PyCFunction)Segment_verify, METH_NOARGS,
     "verify(): check every partition and that no ordinal is in two; raises "
     "CorruptIndexError"},
    {"set_mapped", (PyCFunction)Segment_set_mapped, METH_NOARGS,
     "set_mapped(): declare the buffer a shared read-only mmap of the file, so "
     "that verify and merge drop each partition's pages once read"},
    {"fragments", (PyCFunction)Segment_fragments, METH_NOARGS,
     "[(fragment_id, physical_rows)] in table order"},
    {"centroids", (PyCFunction)Segment_centroids, METH_VARARGS,
     "centroids(out): copy num_partitions x dim float32 into out"},
    {"partition_range", (PyCFunction)Segment_partition_range, METH_VARARGS,
     "partition_range(p) -> (offset, size) of partition p's bytes in the file"},
    {"attached", (PyCFunction)Segment_attached, METH_VARARGS,
     "attached(p) -> whether partition p's bytes can be read"},
    {"attach", (PyCFunction)Segment_attach, METH_VARARGS,
     "attach(p, data): check and attach partition p's bytes (prefix open only)"},
    {"detach", (PyCFunction)Segment_detach, METH_VARARGS,
     "detach(p): make partition p absent again (no search may be using it)"},
    {NULL, NULL, 0, NULL}};

static int segments_from_seq(PyObject *module, PyObject *seq, const bs_segment ***out,
                             Py_ssize_t *n) {
    native_state *st = get_state(module);
    PyObject *fast = PySequence_Fast(seq, "segments must be a sequence");
    if (fast == NULL) return -1;
    *n = PySequence_Fast_GET_SIZE(fast);
    const bs_segment **arr = PyMem_Calloc((size_t)(*n ? *n : 1), sizeof *arr);
    if (arr == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyObject_TypeCheck(o, st->types[SEGMENT_TYPE])) {
            PyErr_Format(PyExc_TypeError, "segments[%zd] is not a Segment", i);
            PyMem_Free(arr);
            Py_DECREF(fast);
            return -1;
        }
        arr[i] = ((SegmentObject *)o)->seg;
    }
    Py_DECREF(fast);
    *out = arr;
    return 0;
}

/* -------------------------------------------------------------- Searcher */

typedef struct {
    PyObject_HEAD
    bs_searcher *s;
    PyObject *segments; /* tuple: keeps every Segment alive */
    bs_candidates *cand; /* scratch of search(), while busy is 0 */
    int busy;
    /* scratch of search_batch_into()'s workers, kept across calls, while
     * batch_busy is 0 */
    bs_candidates **batch_cand;
    unsigned num_batch_cand;
    int batch_busy;
    uint32_t dim;        /* of a query */
    uint32_t num_partitions;
    PyObject *module;
} SearcherObject;

static int Searcher_init(SearcherObject *self, PyObject *args, PyObject *kw) {
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "O", &seq)) return -1;
    const bs_segment **arr;
    Py_ssize_t n;
    if (segments_from_seq(self->module, seq, &arr, &n) < 0) return -1;
    self->segments = PySequence_Tuple(seq);
    if (self->segments == NULL) {
        PyMem_Free(arr);
        return -1;
    }
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_searcher_create(arr, (size_t)n, &self->s, &err);
    Py_END_ALLOW_THREADS
    PyMem_Free(arr);
    if (status != BS_OK) {
        raise_bs(self->module, &err);
        return -1;
    }
    if (n > 0) {
        bs_segment_info in;
        bs_segment_get_info(((SegmentObject *)PyTuple_GET_ITEM(self->segments, 0))->seg, &in);
        self->dim = in.dim;
        self->num_partitions = in.num_partitions;
    }
    self->cand = bs_candidates_new();
    if (self->cand == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Searcher_dealloc(SearcherObject *self) {
    bs_searcher_free(self->s);
    bs_candidates_free(self->cand);
    for (unsigned i = 0; i < self->num_batch_cand; i++) bs_candidates_free(self->batch_cand[i]);
    PyMem_Free(self->batch_cand);
    Py_XDECREF(self->segments);
    dealloc_object((PyObject *)self, self->module);
}

/* The settings search() and search_batch_into() share arrive as one tuple,
 * params = (k, nprobes, eps0, refine_factor, segment_mask, allowed_rowids,
 * allowed_fragments, denied_rowids[, partition_mask, share]): the Python
 * side builds it once per prepared search. The last two make the search one
 * partition share of a distributed search (bitshard.serve): a uint8 flag
 * per partition or None, and a bool. */
enum { NUM_FILTERS = 5 };

/* The search parameters from params; filters receives the five filter
 * buffers (None leaves one out), to be taken with the call's other
 * buffers and then pointed at by set_filters. */
static int parse_params(SearcherObject *self, PyObject *params, bs_search_params *p,
                        buf_arg *filters) {
    PyObject *m = self->module;
    PyObject *k, *nprobes, *eps0, *refine, *mask, *allowed, *frags, *denied;
    PyObject *parts = Py_None, *share = Py_False;
    if (!PyTuple_Check(params)) {
        PyErr_Format(PyExc_TypeError, "params must be a tuple, got %.100s",
                     Py_TYPE(params)->tp_name);
        return -1;
    }
    if (!PyArg_ParseTuple(params, "OOOOOOOO|OO:params", &k, &nprobes, &eps0, &refine, &mask,
                          &allowed, &frags, &denied, &parts, &share))
        return -1;
    memset(p, 0, sizeof *p);
    int is_share = PyObject_IsTrue(share);
    if (is_share < 0) return -1;
    p->share = is_share;
    double e = PyFloat_AsDouble(eps0);
    if (e == -1.0 && PyErr_Occurred()) return -1;
    p->eps0 = (float)e;
    if (u32_arg(m, k, "k", 0, &p->k) < 0 || u32_arg(m, nprobes, "nprobes", 0, &p->nprobes) < 0 ||
        u32_arg(m, refine, "refine_factor", 0, &p->refine_factor) < 0)
        return -1;
    size_t num_segments = (size_t)PyTuple_GET_SIZE(self->segments);
    const buf_arg table[NUM_FILTERS] = {
        BUF("segment_mask", mask, 'b', BUF_OPTIONAL, num_segments),
        BUF("allowed_rowids", allowed, 'U', BUF_OPTIONAL, 0),
        BUF("allowed_fragments", frags, 'U', BUF_OPTIONAL, 0),
        BUF("denied_rowids", denied, 'U', BUF_OPTIONAL, 0),
        BUF("partition_mask", parts, 'b', BUF_OPTIONAL | BUF_EXACT, self->num_partitions),
    };
    memcpy(filters, table, sizeof table);
    return 0;
}

/* Points the parameters at the filter buffers once they are held. */
static void set_filters(bs_search_params *p, const buf_arg *b) {
    p->segment_mask = buf_ptr(&b[0]);
    p->allowed_rowids = buf_ptr(&b[1]);
    p->num_allowed = b[1].held ? buf_items(&b[1].view) : 0;
    p->allowed_fragments = buf_ptr(&b[2]);
    p->num_allowed_fragments = b[2].held ? buf_items(&b[2].view) : 0;
    p->denied_rowids = buf_ptr(&b[3]);
    p->num_denied = b[3].held ? buf_items(&b[3].view) : 0;
    p->partition_mask = buf_ptr(&b[4]);
}

static void stats_add(bs_search_stats *acc, const bs_search_stats *st) {
    acc->partitions_probed += st->partitions_probed;
    acc->codes_scanned += st->codes_scanned;
    acc->codes_stage2 += st->codes_stage2;
    acc->candidates += st->candidates;
}

/* Adds the counts to a caller's uint64[4] (partitions, codes, stage 2,
 * candidates); stats is an optional buffer. */
static void stats_add_u64(const buf_arg *stats, const bs_search_stats *st) {
    uint64_t *acc = buf_ptr(stats);
    if (acc == NULL) return;
    acc[0] += st->partitions_probed;
    acc[1] += st->codes_scanned;
    acc[2] += st->codes_stage2;
    acc[3] += st->candidates;
}

/* Copies the first min(size, cap) candidates of c to the outputs (lb may
 * be NULL); returns the candidate count. */
static size_t copy_candidates(const bs_candidates *c, size_t cap, uint64_t *rowids,
                              float *est, float *lb) {
    size_t n = bs_candidates_size(c);
    size_t m = n < cap ? n : cap;
    memcpy(rowids, bs_candidates_rowids(c), m * sizeof(uint64_t));
    memcpy(est, bs_candidates_estimates(c), m * sizeof(float));
    if (lb != NULL) memcpy(lb, bs_candidates_lower_bounds(c), m * sizeof(float));
    return n;
}

/* search(q, params, out_rowids, out_estimates, out_lower_bounds, stats) -> n
 *
 * One query into caller-owned arrays: the hot path of a prepared search, so
 * nothing is allocated per call. params: see parse_params. stats is None
 * or a uint64[4] that the call adds its counts to; out_lower_bounds may be
 * None. Returns the number of candidates; only the first len(out_rowids)
 * are copied, so a caller whose arrays were short calls again with longer
 * ones. */
static PyObject *Searcher_search(SearcherObject *self, PyObject *args) {
    PyObject *qo, *params, *rowso, *esto, *lbo, *statso;
    if (!PyArg_ParseTuple(args, "OOOOOO", &qo, &params, &rowso, &esto, &lbo, &statso))
        return NULL;
    bs_search_params p;
    buf_arg b[NUM_FILTERS + 5];
    if (parse_params(self, params, &p, b) < 0) return NULL;
    const buf_arg rest[5] = {
        BUF("q", qo, 'f', 0, self->dim),
        BUF("out_rowids", rowso, 'U', BUF_WRITABLE, 0),
        BUF("out_estimates", esto, 'f', BUF_WRITABLE, 0),
        BUF("out_lower_bounds", lbo, 'f', BUF_WRITABLE | BUF_OPTIONAL, 0),
        BUF("stats", statso, 'U', BUF_WRITABLE | BUF_OPTIONAL, 4),
    };
    memcpy(b + NUM_FILTERS, rest, sizeof rest);
    if (bufs_acquire(self->module, b, NBUFS(b)) < 0) return NULL;
    buf_arg *q = &b[NUM_FILTERS], *rowids = q + 1, *est = q + 2, *lb = q + 3, *stats = q + 4;
    set_filters(&p, b);
    size_t cap = buf_items(&rowids->view);
    if (buf_items(&est->view) < cap) cap = buf_items(&est->view);
    if (lb->held && buf_items(&lb->view) < cap) cap = buf_items(&lb->view);

    /* The object's scratch serves one call at a time; a concurrent caller
     * (another Python thread, the GIL released below) gets its own. The flag
     * is read and set under the GIL. */
    PyObject *result = NULL;
    bs_candidates *c = self->cand;
    int own = 0;
    if (self->busy || c == NULL) {
        c = bs_candidates_new();
        if (c == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        own = 1;
    } else {
        self->busy = 1;
    }
    bs_search_stats st;
    bs_error err;
    bs_status status;
    size_t n = 0;
    Py_BEGIN_ALLOW_THREADS
    status = bs_search(self->s, q->view.buf, &p, c, &st, &err);
    if (status == BS_OK) n = copy_candidates(c, cap, rowids->view.buf, est->view.buf, buf_ptr(lb));
    Py_END_ALLOW_THREADS
    if (own)
        bs_candidates_free(c);
    else
        self->busy = 0;
    if (status != BS_OK) {
        raise_bs(self->module, &err);
        goto done;
    }
    stats_add_u64(stats, &st);
    result = PyLong_FromSize_t(n);
done:
    bufs_release(b, NBUFS(b));
    return result;
}

/* ------------------------------------------- one query, whole in C */

/* The one-query search of a prepared search whose scan answer is final
 * (more than one bit, no refine_factor, nothing searched exactly, no
 * segment read by range; Searcher.search decides). Searcher.prepare_one
 * parses the settings once and holds their filter buffers; search(q) then
 * costs one buffer request for the query, bs_search, and the two new
 * arrays it returns: in Python the same query took argument checks, two
 * output arrays, the settings tuple parsed and five buffers taken per
 * call (about 15k instructions of a 290k query at nprobes 8 on WordNet). */
typedef struct {
    PyObject_HEAD
    SearcherObject *searcher;
    PyObject *params; /* holds the filter arrays the views point into */
    bs_search_params p;
    buf_arg filters[NUM_FILTERS];
    buf_arg stats; /* uint64[4] or None */
    PyObject *empty, *k_obj, *rowid_dtype, *dist_dtype;
    PyObject *module;
} OneSearchObject;

static void OneSearch_dealloc(OneSearchObject *self) {
    bufs_release(self->filters, NUM_FILTERS);
    bufs_release(&self->stats, 1);
    Py_XDECREF(self->searcher);
    Py_XDECREF(self->params);
    Py_XDECREF(self->empty);
    Py_XDECREF(self->k_obj);
    Py_XDECREF(self->rowid_dtype);
    Py_XDECREF(self->dist_dtype);
    dealloc_object((PyObject *)self, self->module);
}

/* A new 1-D array of k items from empty(k, dtype), and its writable buffer. */
static PyObject *new_output(OneSearchObject *self, PyObject *dtype, Py_buffer *view) {
    PyObject *args[2] = {self->k_obj, dtype};
    PyObject *a = PyObject_Vectorcall(self->empty, args, 2, NULL);
    if (a == NULL) return NULL;
    if (PyObject_GetBuffer(a, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    if ((size_t)view->len != (size_t)self->p.k * (size_t)view->itemsize ||
        (view->itemsize != 8 && view->itemsize != 4)) {
        PyBuffer_Release(view);
        Py_DECREF(a);
        PyErr_SetString(PyExc_TypeError, "empty() returned an array of another shape");
        return NULL;
    }
    return a;
}

/* search(q) -> (rowids uint64[k], distances float32[k]) or None
 *
 * q must be a C-contiguous native-order float32 buffer of dim items;
 * anything else returns None, and the caller takes the path that converts
 * it or refuses it with its own messages. The values are checked by
 * bs_search (a NaN, Inf or too large value: the InvalidInputError search()
 * raises). The first min(n, k) candidates (already the k best, in
 * (estimate, row id) order) are copied; the rest of the k entries are row
 * UINT64_MAX and distance +inf. The counts are added to stats. */
static PyObject *OneSearch_search(OneSearchObject *self, PyObject *q) {
    SearcherObject *srch = self->searcher;
    Py_buffer qv;
    if (PyObject_GetBuffer(q, &qv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    const char *fmt = qv.format ? qv.format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    if (qv.ndim != 1 || qv.itemsize != 4 || fmt[0] != 'f' || fmt[1] != '\0' ||
        qv.shape == NULL || qv.shape[0] != (Py_ssize_t)srch->dim) {
        PyBuffer_Release(&qv);
        Py_RETURN_NONE;
    }
    PyObject *result = NULL, *rows = NULL, *dists = NULL;
    Py_buffer rv, dv;
    int have_rv = 0, have_dv = 0;
    if ((rows = new_output(self, self->rowid_dtype, &rv)) == NULL) goto done;
    have_rv = 1;
    if ((dists = new_output(self, self->dist_dtype, &dv)) == NULL) goto done;
    have_dv = 1;
    if (rv.itemsize != 8 || dv.itemsize != 4) {
        PyErr_SetString(PyExc_TypeError, "the output dtypes must be uint64 and float32");
        goto done;
    }
    /* The searcher's scratch serves one call at a time, as in search(). */
    bs_candidates *c = srch->cand;
    int own = 0;
    if (srch->busy || c == NULL) {
        if ((c = bs_candidates_new()) == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        own = 1;
    } else {
        srch->busy = 1;
    }
    const size_t k = self->p.k;
    bs_search_stats st;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_search(srch->s, qv.buf, &self->p, c, &st, &err);
    if (status == BS_OK) {
        size_t n = bs_candidates_size(c);
        if (n > k) n = k;
        uint64_t *r = rv.buf;
        float *d = dv.buf;
        memcpy(r, bs_candidates_rowids(c), n * sizeof *r);
        memcpy(d, bs_candidates_estimates(c), n * sizeof *d);
        for (size_t i = n; i < k; i++) {
            r[i] = UINT64_MAX;
            d[i] = INFINITY;
        }
    }
    Py_END_ALLOW_THREADS
    if (own)
        bs_candidates_free(c);
    else
        srch->busy = 0;
    if (status != BS_OK) {
        raise_bs(self->module, &err);
        goto done;
    }
    stats_add_u64(&self->stats, &st);
    if ((result = PyTuple_New(2)) == NULL) goto done;
    PyTuple_SET_ITEM(result, 0, rows);
    PyTuple_SET_ITEM(result, 1, dists);
    rows = dists = NULL;
done:
    if (have_rv) PyBuffer_Release(&rv);
    if (have_dv) PyBuffer_Release(&dv);
    Py_XDECREF(rows);
    Py_XDECREF(dists);
    PyBuffer_Release(&qv);
    return result;
}

static PyMethodDef OneSearch_methods[] = {
    {"search", (PyCFunction)OneSearch_search, METH_O,
     "search(q) -> (rowids, distances) of k entries, or None for a query this path does "
     "not take (not a C-contiguous float32 buffer of dim items)"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot OneSearch_slots[] = {
    {Py_tp_dealloc, OneSearch_dealloc},
    {Py_tp_methods, OneSearch_methods},
    {Py_tp_doc, (void *)"One query of a prepared search, whole in C (Searcher.prepare_one)."},
    {0, NULL}};
static PyType_Spec OneSearch_spec = {"bitshard._native.OneSearch", sizeof(OneSearchObject), 0,
                                     Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
                                     OneSearch_slots};

/* prepare_one(params, stats, empty, rowid_dtype, dist_dtype) -> OneSearch
 *
 * params: see parse_params (its filter arrays are held until the OneSearch
 * goes); stats: None or a uint64[4] the searches add their counts to;
 * empty(k, dtype) makes each output array (numpy.empty), with the two
 * dtypes (uint64, float32). */
static PyObject *Searcher_prepare_one(SearcherObject *self, PyObject *args) {
    PyObject *params, *statso, *empty, *rdt, *ddt;
    if (!PyArg_ParseTuple(args, "OOOOO", &params, &statso, &empty, &rdt, &ddt)) return NULL;
    if (!PyCallable_Check(empty)) {
        PyErr_SetString(PyExc_TypeError, "empty must be callable");
        return NULL;
    }
    PyTypeObject *tp = get_state(self->module)->types[ONE_SEARCH_TYPE];
    OneSearchObject *o = (OneSearchObject *)tp->tp_alloc(tp, 0);
    if (o == NULL) return NULL;
    o->module = Py_NewRef(self->module);
    if (parse_params(self, params, &o->p, o->filters) < 0) {
        memset(o->filters, 0, sizeof o->filters);
        Py_DECREF(o);
        return NULL;
    }
    const buf_arg stats = BUF("stats", statso, 'U', BUF_WRITABLE | BUF_OPTIONAL, 4);
    o->stats = stats;
    if (bufs_acquire(self->module, o->filters, NUM_FILTERS) < 0) {
        Py_DECREF(o);
        return NULL;
    }
    if (bufs_acquire(self->module, &o->stats, 1) < 0) {
        Py_DECREF(o);
        return NULL;
    }
    set_filters(&o->p, o->filters);
    o->k_obj = PyLong_FromUnsignedLong(o->p.k);
    if (o->k_obj == NULL) {
        Py_DECREF(o);
        return NULL;
    }
    o->searcher = (SearcherObject *)Py_NewRef((PyObject *)self);
    o->params = Py_NewRef(params);
    o->empty = Py_NewRef(empty);
    o->rowid_dtype = Py_NewRef(rdt);
    o->dist_dtype = Py_NewRef(ddt);
    return (PyObject *)o;
}

/* ----------------------------------------------------- batched search */

/* What every worker of a batch reads, written before the workers start. */
typedef struct {
    const bs_searcher *s;
    const float *Q;
    size_t nq;
    uint32_t dim;
    /* query i's first min(n_i, cap) candidates go to out_*[i * cap ...]
     * (out_lb may be NULL), n_i to out_counts[i] */
    uint64_t *out_rowids;
    float *out_est;
    float *out_lb;
    uint64_t *out_counts;
    float *out_ub; /* a share's search: query i's k smallest upper bounds at i * k */
    size_t cap;
    /* The next query to take, and a flag set by a worker that failed so the
     * others stop taking queries: on a cache line of their own, since every
     * worker writes them once per query while the fields above are read
     * throughout each search. */
    _Alignas(64) atomic_size_t next;
    atomic_int failed;
    char pad_[64 - sizeof(atomic_size_t) - sizeof(atomic_int)];
} batch_job;

/* One worker's own state, a cache line apart from the others': its copy of
 * the search parameters (bs_search reads them for every candidate), its
 * scratch, counts and the first error it met. */
typedef struct {
    _Alignas(64) batch_job *job;
    bs_search_params params;
    bs_candidates *c;
    bs_search_stats stats;
    size_t failed_at; /* the query whose search failed (nq: none) */
    bs_status status;
    bs_error err;
} batch_worker;

static void *batch_run(void *arg) {
    batch_worker *w = arg;
    batch_job *job = w->job;
    memset(&w->stats, 0, sizeof w->stats);
    w->failed_at = job->nq;
    w->status = BS_OK;
    w->err.code = BS_OK;
    w->err.message[0] = '\0';
    for (;;) {
        if (atomic_load_explicit(&job->failed, memory_order_relaxed)) break;
        size_t qi = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (qi >= job->nq) break;
        bs_search_stats st;
        bs_status status =
            bs_search(job->s, job->Q + qi * job->dim, &w->params, w->c, &st, &w->err);
        if (status != BS_OK) {
            w->status = status;
            w->failed_at = qi;
            atomic_store_explicit(&job->failed, 1, memory_order_relaxed);
            break;
        }
        stats_add(&w->stats, &st);
        size_t at = qi * job->cap;
        job->out_counts[qi] = copy_candidates(w->c, job->cap, job->out_rowids + at,
                                              job->out_est + at,
                                              job->out_lb ? job->out_lb + at : NULL);
        if (job->out_ub != NULL) {
            /* Fewer than k codes: the rest are +inf, which keeps the k-th
             * smallest over all shares what one search's heap would give. */
            const float *ub;
            size_t m = bs_candidates_upper_bounds(w->c, &ub);
            float *dst = job->out_ub + qi * (size_t)w->params.k;
            memcpy(dst, ub, m * sizeof(float));
            for (size_t i = m; i < w->params.k; i++) dst[i] = INFINITY;
        }
    }
    return NULL;
}

/* Runs a prepared job on workers[0 .. n) with the GIL released: worker 0 on
 * the calling thread, the others on threads started for the call (one
 * fewer thread to start and to wake than workers, and the caller does not
 * sit idle in a join). A worker whose thread cannot start runs on the
 * caller after worker 0; queries go to whichever worker is free, and every
 * query's answer is its own, so the split changes no answer. */
static void run_batch(batch_worker *workers, unsigned n) {
    pthread_t tids[256];
    unsigned char started[256];
    Py_BEGIN_ALLOW_THREADS
    for (unsigned i = 1; i < n; i++)
        started[i] = pthread_create(&tids[i], NULL, batch_run, &workers[i]) == 0;
    batch_run(&workers[0]);
    for (unsigned i = 1; i < n; i++) {
        if (started[i])
            pthread_join(tids[i], NULL);
        else
            batch_run(&workers[i]);
    }
    Py_END_ALLOW_THREADS
}

/* Gives back what batch_scratch returned. Called with the GIL held. */
static void batch_scratch_release(SearcherObject *self, bs_candidates **arr, unsigned n,
                                  int own) {
    if (!own) {
        self->batch_busy = 0;
        return;
    }
    for (unsigned i = 0; i < n; i++) bs_candidates_free(arr[i]);
    PyMem_Free(arr);
}

/* The scratch of n batch workers: the searcher's own (kept across calls so
 * that a thread's buffers are not grown again for every batch) unless
 * another batch holds it, in which case new scratch for this call (*own
 * set, freed by batch_scratch_release). Called with the GIL held. */
static bs_candidates **batch_scratch(SearcherObject *self, unsigned n, int *own) {
    bs_candidates **arr;
    *own = self->batch_busy;
    if (!*own && n > self->num_batch_cand) {
        arr = PyMem_Realloc(self->batch_cand, n * sizeof *arr);
        if (arr == NULL) return NULL;
        for (unsigned i = self->num_batch_cand; i < n; i++) arr[i] = NULL;
        self->batch_cand = arr;
        self->num_batch_cand = n;
    }
    if (*own) {
        arr = PyMem_Calloc(n, sizeof *arr);
        if (arr == NULL) return NULL;
    } else {
        arr = self->batch_cand;
    }
    for (unsigned i = 0; i < n; i++)
        if (arr[i] == NULL && (arr[i] = bs_candidates_new()) == NULL) {
            batch_scratch_release(self, arr, n, *own);
            return NULL;
        }
    if (!*own) self->batch_busy = 1;
    return arr;
}

/* search_batch_into(Q, nq, num_threads, params, out_rowids, out_estimates,
 *                   out_lower_bounds, out_counts, stats[, out_upper_bounds]) -> None
 *
 * nq queries on up to num_threads threads (at most 256), into caller
 * arrays: query i's first min(n_i, cap) candidates go to
 * out_rowids[i * cap ...], out_estimates[i * cap ...] and, unless None,
 * out_lower_bounds[i * cap ...] (cap = len(out_rowids) / nq), n_i to
 * out_counts[i]; stats (uint64[4] or None) accumulates the counts. A
 * caller whose n_i exceeded cap searches those queries again with longer
 * arrays. params: see parse_params. out_upper_bounds (float32, nq * k, or
 * None) receives a share's search's upper bounds: query i's k smallest at
 * [i * k ...], ascending, +inf past the codes it scanned. */
static PyObject *Searcher_search_batch_into(SearcherObject *self, PyObject *args) {
    PyObject *qo, *nq_o, *threads_o, *params, *rowso, *esto, *lbo, *countso, *statso;
    PyObject *ubo = Py_None;
    if (!PyArg_ParseTuple(args, "OOOOOOOOO|O", &qo, &nq_o, &threads_o, &params, &rowso, &esto,
                          &lbo, &countso, &statso, &ubo))
        return NULL;
    PyObject *m = self->module;
    size_t nq;
    unsigned long long nthreads;
    if (count_arg(m, nq_o, "nq", &nq) < 0 ||
        int_arg(m, threads_o, "num_threads", 1, PY_SSIZE_T_MAX, &nthreads) < 0)
        return NULL;
    if (nthreads > 256) nthreads = 256;
    bs_search_params p;
    buf_arg b[NUM_FILTERS + 7];
    if (parse_params(self, params, &p, b) < 0) return NULL;
    const buf_arg rest[7] = {
        BUF("Q", qo, 'f', 0, items_of(nq, self->dim)),
        BUF("out_rowids", rowso, 'U', BUF_WRITABLE, 0),
        BUF("out_estimates", esto, 'f', BUF_WRITABLE, 0),
        BUF("out_lower_bounds", lbo, 'f', BUF_WRITABLE | BUF_OPTIONAL, 0),
        BUF("out_counts", countso, 'U', BUF_WRITABLE, nq),
        BUF("stats", statso, 'U', BUF_WRITABLE | BUF_OPTIONAL, 4),
        BUF("out_upper_bounds", ubo, 'f', BUF_WRITABLE | BUF_OPTIONAL, items_of(nq, p.k)),
    };
    memcpy(b + NUM_FILTERS, rest, sizeof rest);
    if (bufs_acquire(m, b, NBUFS(b)) < 0) return NULL;
    buf_arg *Q = &b[NUM_FILTERS], *rowids = Q + 1, *est = Q + 2, *lb = Q + 3, *counts = Q + 4,
            *stats = Q + 5, *ubs = Q + 6;
    set_filters(&p, b);
    PyObject *result = NULL;
    size_t cap = nq ? buf_items(&rowids->view) / nq : 0;
    if (check_len(m, &est->view, cap * nq, 0, "out_estimates") < 0 ||
        (lb->held && check_len(m, &lb->view, cap * nq, 0, "out_lower_bounds") < 0))
        goto done;
    /* Never more workers than queries: a worker without a query would cost
     * a thread start and its scratch. */
    unsigned nw = nthreads < nq ? (unsigned)nthreads : (unsigned)(nq ? nq : 1);
    batch_job job;
    memset(&job, 0, sizeof job);
    job.s = self->s;
    job.Q = Q->view.buf;
    job.nq = nq;
    job.dim = self->dim;
    job.out_rowids = rowids->view.buf;
    job.out_est = est->view.buf;
    job.out_lb = buf_ptr(lb);
    job.out_counts = counts->view.buf;
    job.out_ub = buf_ptr(ubs);
    job.cap = cap;
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, 0);
    int own;
    bs_candidates **scratch = batch_scratch(self, nw, &own);
    /* aligned: each worker's state starts a cache line of its own */
    batch_worker *workers = scratch ? aligned_alloc(64, nw * sizeof *workers) : NULL;
    if (workers == NULL) {
        if (scratch) batch_scratch_release(self, scratch, nw, own);
        PyErr_NoMemory();
        goto done;
    }
    memset(workers, 0, nw * sizeof *workers);
    for (unsigned i = 0; i < nw; i++) {
        workers[i].job = &job;
        workers[i].params = p;
        workers[i].c = scratch[i];
    }
    run_batch(workers, nw);
    batch_scratch_release(self, scratch, nw, own);
    /* The error of the earliest query that failed, so that a batch with
     * several bad queries names the same one however the queries were
     * shared out. */
    bs_search_stats total;
    memset(&total, 0, sizeof total);
    const batch_worker *bad = NULL;
    for (unsigned i = 0; i < nw; i++) {
        stats_add(&total, &workers[i].stats);
        if (workers[i].status != BS_OK && (bad == NULL || workers[i].failed_at < bad->failed_at))
            bad = &workers[i];
    }
    if (bad != NULL) {
        bs_error err = bad->err;
        err.code = bad->status;
        free(workers);
        raise_bs(m, &err);
        goto done;
    }
    free(workers);
    stats_add_u64(stats, &total);
    result = Py_NewRef(Py_None);
done:
    bufs_release(b, NBUFS(b));
    return result;
}

/* probes(Q, nq, nprobes, out) -> n: the n = min(nprobes, num_partitions)
 * partitions bs_search probes for each of the nq queries, into out
 * (uint32, nq * n). */
static PyObject *Searcher_probes(SearcherObject *self, PyObject *args) {
    PyObject *qo, *nq_o, *np_o, *outo;
    if (!PyArg_ParseTuple(args, "OOOO", &qo, &nq_o, &np_o, &outo)) return NULL;
    PyObject *m = self->module;
    size_t nq;
    uint32_t nprobes;
    if (count_arg(m, nq_o, "nq", &nq) < 0 || u32_arg(m, np_o, "nprobes", 1, &nprobes) < 0)
        return NULL;
    bs_segment_info in;
    bs_segment_get_info(((SegmentObject *)PyTuple_GET_ITEM(self->segments, 0))->seg, &in);
    uint32_t n = nprobes < in.num_partitions ? nprobes : in.num_partitions;
    buf_arg b[] = {BUF("Q", qo, 'f', 0, items_of(nq, self->dim)),
                   BUF("out", outo, 'u', BUF_WRITABLE, items_of(nq, n))};
    if (bufs_acquire(m, b, NBUFS(b)) < 0) return NULL;
    bs_candidates *c = bs_candidates_new();
    if (c == NULL) {
        bufs_release(b, NBUFS(b));
        return PyErr_NoMemory();
    }
    bs_error err;
    bs_status status = BS_OK;
    const float *Q = b[0].view.buf;
    uint32_t *out = b[1].view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < nq && status == BS_OK; i++) {
        uint32_t got = 0;
        status = bs_search_probes(self->s, Q + i * self->dim, nprobes, c, out + i * n, &got,
                                  &err);
    }
    Py_END_ALLOW_THREADS
    bs_candidates_free(c);
    bufs_release(b, NBUFS(b));
    if (status != BS_OK) return raise_bs(m, &err);
    return PyLong_FromUnsignedLong(n);
}

static PyMethodDef Searcher_methods[] = {
    {"probes", (PyCFunction)Searcher_probes, METH_VARARGS,
     "probes(Q, nq, nprobes, out) -> n: the partitions each query probes (out: uint32 nq x n)"},
    {"search", (PyCFunction)Searcher_search, METH_VARARGS,
     "search(q, params, out_rowids, out_estimates, out_lower_bounds, stats) -> number of "
     "candidates"},
    {"prepare_one", (PyCFunction)Searcher_prepare_one, METH_VARARGS,
     "prepare_one(params, stats, empty, rowid_dtype, dist_dtype) -> OneSearch"},
    {"search_batch_into", (PyCFunction)Searcher_search_batch_into, METH_VARARGS,
     "search_batch_into(Q, nq, num_threads, params, out_rowids, out_estimates, "
     "out_lower_bounds, out_counts, stats[, out_upper_bounds]) -> None"},
    {NULL, NULL, 0, NULL}};

/* ------------------------------------------------------- type boilerplate */

#define NATIVE_TYPE(Name, Doc)                                                    \
    static PyObject *Name##_new(PyTypeObject *type, PyObject *args, PyObject *kw) { \
        Name##Object *self = (Name##Object *)type->tp_alloc(type, 0);             \
        if (self == NULL) return NULL;                                            \
        PyObject *mod = PyType_GetModuleByDef(type, &native_module);              \
        self->module = Py_XNewRef(mod);                                           \
        return (PyObject *)self;                                                  \
    }                                                                             \
    static PyType_Slot Name##_slots[] = {                                         \
        {Py_tp_new, Name##_new},                                                  \
        {Py_tp_init, Name##_init},                                                \
        {Py_tp_dealloc, Name##_dealloc},                                          \
        {Py_tp_methods, Name##_methods},                                          \
        {Py_tp_doc, (void *)Doc},                                                 \
        {0, NULL}};                                                               \
    static PyType_Spec Name##_spec = {"bitshard._native." #Name,                  \
                                      sizeof(Name##Object), 0,                    \
                                      Py_TPFLAGS_DEFAULT, Name##_slots};

static struct PyModuleDef native_module;

NATIVE_TYPE(Builder, "A segment under construction (bs_segment_builder).")
NATIVE_TYPE(Segment, "An opened, validated segment over a held buffer.")
NATIVE_TYPE(Searcher, "A search over compatible segments.")

static PyObject *Rotation_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    RotationObject *self = (RotationObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->module = Py_XNewRef(PyType_GetModuleByDef(type, &native_module));
    return (PyObject *)self;
}
static PyType_Slot Rotation_slots[] = {{Py_tp_new, Rotation_new},
                                       {Py_tp_init, Rotation_init},
                                       {Py_tp_dealloc, Rotation_dealloc},
                                       {Py_tp_methods, Rotation_methods},
                                       {Py_tp_getset, Rotation_getset},
                                       {Py_tp_doc, (void *)"A rotation transform."},
                                       {0, NULL}};
static PyType_Spec Rotation_spec = {"bitshard._native.Rotation", sizeof(RotationObject), 0,
                                    Py_TPFLAGS_DEFAULT, Rotation_slots};

/* ------------------------------------------------------ module functions */

static PyObject *fn_kmeans_train(PyObject *module, PyObject *args) {
    PyObject *xo, *n_o, *d_o, *k_o, *metric_o, *iters_o, *seed_o, *outo, *threads_o = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOO|O", &xo, &n_o, &d_o, &k_o, &metric_o, &iters_o,
                          &seed_o, &outo, &threads_o))
        return NULL;
    size_t n;
    uint32_t d, k, iters, threads = 1;
    int metric;
    unsigned long long seed;
    if (count_arg(module, n_o, "n", &n) < 0 || u32_arg(module, d_o, "d", 0, &d) < 0 ||
        u32_arg(module, k_o, "k", 0, &k) < 0 || enum_arg(module, metric_o, "metric", &metric) < 0 ||
        u32_arg(module, iters_o, "max_iters", 0, &iters) < 0 ||
        int_arg(module, seed_o, "seed", 0, UINT64_MAX, &seed) < 0 ||
        (threads_o != NULL && u32_arg(module, threads_o, "threads", 0, &threads) < 0))
        return NULL;
    buf_arg b[] = {
        BUF("x", xo, 'f', 0, items_of(n, d)),
        BUF("out", outo, 'f', BUF_WRITABLE, items_of(k, d)),
    };
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    int blas = blas_single(threads);
    status = bs_kmeans_train_mt(b[0].view.buf, n, d, k, (bs_metric)metric, iters, seed, threads,
                                b[1].view.buf, &err);
    blas_restore(blas);
    Py_END_ALLOW_THREADS
    return finish(module, b, NBUFS(b), status, &err);
}

static PyObject *fn_ivf_fingerprint(PyObject *module, PyObject *args) {
    PyObject *co, *k_o, *d_o, *metric_o;
    if (!PyArg_ParseTuple(args, "OOOO", &co, &k_o, &d_o, &metric_o)) return NULL;
    uint32_t k, d;
    int metric;
    if (u32_arg(module, k_o, "k", 0, &k) < 0 || u32_arg(module, d_o, "d", 0, &d) < 0 ||
        enum_arg(module, metric_o, "metric", &metric) < 0)
        return NULL;
    buf_arg b[] = {BUF("centroids", co, 'f', 0, items_of(k, d))};
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    PyObject *r = fingerprint_bytes(bs_ivf_fingerprint(b[0].view.buf, k, d, (bs_metric)metric));
    bufs_release(b, NBUFS(b));
    return r;
}

static PyObject *fn_hash64(PyObject *module, PyObject *args) {
    PyObject *datao, *seed_o = NULL;
    if (!PyArg_ParseTuple(args, "O|O", &datao, &seed_o)) return NULL;
    unsigned long long seed = 0;
    if (seed_o != NULL && int_arg(module, seed_o, "seed", 0, UINT64_MAX, &seed) < 0)
        return NULL;
    buf_arg b[] = {BUF("data", datao, 'b', 0, 0)};
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    uint64_t h;
    Py_BEGIN_ALLOW_THREADS
    h = bs_hash64(b[0].view.buf, (size_t)b[0].view.len, seed);
    Py_END_ALLOW_THREADS
    bufs_release(b, NBUFS(b));
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *fn_padded_dim(PyObject *module, PyObject *args) {
    PyObject *d_o;
    uint32_t d;
    if (!PyArg_ParseTuple(args, "O", &d_o)) return NULL;
    if (u32_arg(module, d_o, "dim", 0, &d) < 0) return NULL;
    return PyLong_FromUnsignedLong(bs_padded_dim(d));
}

static PyObject *fn_merge(PyObject *module, PyObject *args) {
    PyObject *seq, *uuido, *flags_o = NULL;
    const char *path;
    if (!PyArg_ParseTuple(args, "OOs|O", &seq, &uuido, &path, &flags_o)) return NULL;
    uint32_t flags = 0;
    if (flags_o != NULL && u32_arg(module, flags_o, "flags", 0, &flags) < 0) return NULL;
    buf_arg b[] = {BUF("uuid", uuido, 'b', BUF_EXACT, 16)};
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    const bs_segment **arr;
    Py_ssize_t n;
    if (segments_from_seq(module, seq, &arr, &n) < 0) {
        bufs_release(b, NBUFS(b));
        return NULL;
    }
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_segment_merge_flags(arr, (size_t)n, b[0].view.buf, path, flags, &err);
    Py_END_ALLOW_THREADS
    PyMem_Free(arr);
    return finish(module, b, NBUFS(b), status, &err);
}

/* remap(segments, maps, fragment_ids, fragment_rows, uuid, path, flags=0,
 * identities=None): maps[i] is a uint64 array, one new row id (or
 * 2^64 - 1: dropped) per ordinal of segments[i]; the library checks every
 * entry. flags: BS_WRITE_*. identities: 16 bytes per fragment_ids entry,
 * or None (zeros). */
static PyObject *fn_remap(PyObject *module, PyObject *args) {
    PyObject *seq, *maps_o, *fido, *frowo, *uuido, *flags_o = NULL, *idento = Py_None;
    const char *path;
    if (!PyArg_ParseTuple(args, "OOOOOs|OO", &seq, &maps_o, &fido, &frowo, &uuido, &path,
                          &flags_o, &idento))
        return NULL;
    uint32_t flags = 0;
    if (flags_o != NULL && u32_arg(module, flags_o, "flags", 0, &flags) < 0) return NULL;
    const bs_segment **arr;
    Py_ssize_t n;
    if (segments_from_seq(module, seq, &arr, &n) < 0) return NULL;
    PyObject *maps = PySequence_Fast(maps_o, "maps must be a sequence");
    if (maps == NULL) {
        PyMem_Free(arr);
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(maps) != n) {
        PyErr_Format(invalid_input(module), "maps holds %zd items, segments %zd",
                     PySequence_Fast_GET_SIZE(maps), n);
        Py_DECREF(maps);
        PyMem_Free(arr);
        return NULL;
    }
    buf_arg b[] = {
        BUF("uuid", uuido, 'b', BUF_EXACT, 16),
        BUF("fragment_ids", fido, 'U', 0, 0),
        BUF("fragment_rows", frowo, 'U', 0, 0),
        BUF("identities", idento, 'b', BUF_OPTIONAL, 0),
    };
    Py_buffer *views = PyMem_Calloc((size_t)(n ? n : 1), sizeof *views);
    bs_remap_input *in = PyMem_Calloc((size_t)(n ? n : 1), sizeof *in);
    Py_ssize_t held = 0;
    PyObject *result = NULL;
    if (views == NULL || in == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n; held++) {
        char name[32];
        snprintf(name, sizeof name, "maps[%zd]", held);
        if (get_buf(PySequence_Fast_GET_ITEM(maps, held), &views[held], 'U', 0, name) < 0)
            goto done;
        in[held].segment = arr[held];
        in[held].row_map = views[held].buf;
        in[held].map_len = buf_items(&views[held]);
    }
    if (bufs_acquire(module, b, NBUFS(b)) < 0) goto done;
    size_t nf = buf_items(&b[1].view);
    if (nf > UINT32_MAX) {
        PyErr_Format(invalid_input(module), "fragment_ids holds %zu items, at most %u", nf,
                     (unsigned)UINT32_MAX);
        bufs_release(b, NBUFS(b));
        goto done;
    }
    if (check_len(module, &b[2].view, nf, 1, "fragment_rows") < 0 ||
        (b[3].held && check_len(module, &b[3].view, nf * 16, 1, "identities") < 0)) {
        bufs_release(b, NBUFS(b));
        goto done;
    }
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_segment_remap_flags(in, (size_t)n, b[1].view.buf, b[2].view.buf,
                                    (uint32_t)nf, buf_ptr(&b[3]), b[0].view.buf, path, flags,
                                    &err);
    Py_END_ALLOW_THREADS
    result = finish(module, b, NBUFS(b), status, &err);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(in);
    Py_DECREF(maps);
    PyMem_Free(arr);
    return result;
}

static PyObject *fn_exact_distances(PyObject *module, PyObject *args) {
    PyObject *metric_o, *qo, *xo, *n_o, *dim_o, *outo;
    if (!PyArg_ParseTuple(args, "OOOOOO", &metric_o, &qo, &xo, &n_o, &dim_o, &outo))
        return NULL;
    int metric;
    size_t n;
    uint32_t dim;
    if (enum_arg(module, metric_o, "metric", &metric) < 0 ||
        count_arg(module, n_o, "n", &n) < 0 || u32_arg(module, dim_o, "dim", 0, &dim) < 0)
        return NULL;
    buf_arg b[] = {
        BUF("q", qo, 'f', 0, dim),
        BUF("x", xo, 'f', 0, items_of(n, dim)),
        BUF("out", outo, 'f', BUF_WRITABLE, n),
    };
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_exact_distances((bs_metric)metric, b[0].view.buf, b[1].view.buf, n, dim,
                                b[2].view.buf, &err);
    Py_END_ALLOW_THREADS
    return finish(module, b, NBUFS(b), status, &err);
}

/* rerank_gate(lb, d, heap, heap_n, k) -> (stop, heap_n); heap is a
 * writable float32 buffer of k entries carried across calls. */
static PyObject *fn_rerank_gate(PyObject *module, PyObject *args) {
    PyObject *lbo, *dO, *heapo, *heap_n_o, *k_o;
    if (!PyArg_ParseTuple(args, "OOOOO", &lbo, &dO, &heapo, &heap_n_o, &k_o)) return NULL;
    uint32_t heap_n, k;
    if (u32_arg(module, heap_n_o, "heap_n", 0, &heap_n) < 0 ||
        u32_arg(module, k_o, "k", 1, &k) < 0)
        return NULL;
    if (heap_n > k)
        return PyErr_Format(invalid_input(module), "heap_n must be <= k (%u), got %u", k,
                            heap_n);
    buf_arg b[] = {
        BUF("lb", lbo, 'f', 0, 0),
        BUF("d", dO, 'f', 0, 0),
        BUF("heap", heapo, 'f', BUF_WRITABLE, k),
    };
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    PyObject *r = NULL;
    size_t n = buf_items(&b[0].view);
    if (check_len(module, &b[1].view, n, 0, "d") == 0) {
        uint32_t hn = heap_n;
        size_t stop = bs_rerank_gate(b[0].view.buf, b[1].view.buf, n, k, b[2].view.buf, &hn);
        r = Py_BuildValue("(nI)", (Py_ssize_t)stop, hn);
    }
    bufs_release(b, NBUFS(b));
    return r;
}

/* Candidates whose distances are computed together in rerank_gated: the
 * gate is still applied one candidate at a time, so at most RERANK_CHUNK - 1
 * distances past a query's stop are computed and not used (never read
 * back), against one |q|^2 per chunk for cosine. */
enum { RERANK_CHUNK = 8 };

/* The gate over one query's candidates 0 .. n-1 (lower bounds lb, in
 * order), candidate t's vector at vecs + idx[t] * dim: takes candidates in
 * (distance into d[t], pushed on the max-heap of *hn <= k entries) until
 * the first whose lower bound exceeds the k-th best distance; *stop is its
 * index (n if none). Distances are computed RERANK_CHUNK at a time from
 * rows gathered into chunk (RERANK_CHUNK * dim floats); *gathered counts
 * the rows read. check: each row read is first checked against the
 * accepted-values rule, and the first refused one ends the call with
 * *refused set to its t (*refused is n otherwise). */
static bs_status gate_rows(bs_metric metric, const float *q, uint32_t dim, const float *vecs,
                           const uint64_t *idx, const float *lb, size_t n, uint32_t k,
                           float *heap, uint32_t *hn, float *d, float *chunk, int check,
                           size_t *stop, size_t *gathered, size_t *refused, bs_error *err) {
    *stop = n;
    *gathered = 0;
    *refused = n;
    for (size_t j = 0; j < n; j += RERANK_CHUNK) {
        /* the gate's test first: a chunk the gate stops at its start is not
         * computed */
        if (*hn == k && lb[j] > heap[0]) {
            *stop = j;
            return BS_OK;
        }
        const size_t c = n - j < RERANK_CHUNK ? n - j : RERANK_CHUNK;
        for (size_t t = 0; t < c; t++) {
            const float *v = vecs + (size_t)idx[j + t] * dim;
            float *row = chunk + t * dim;
            memcpy(row, v, dim * sizeof(float));
            if (check) {
                /* the largest magnitude's bits: NaN and inf sort above
                 * every finite value; no early exit, so it vectorises */
                uint32_t most = 0;
                for (uint32_t e = 0; e < dim; e++) {
                    uint32_t bits;
                    memcpy(&bits, row + e, sizeof bits);
                    bits &= 0x7fffffffu;
                    most = bits > most ? bits : most;
                }
                float lim = (float)BS_MAX_ABS_VALUE;
                uint32_t lim_bits;
                memcpy(&lim_bits, &lim, sizeof lim_bits);
                if (most > lim_bits) {
                    *refused = j + t;
                    *stop = j;
                    return BS_OK;
                }
            }
        }
        *gathered += c;
        const bs_status st = bs_exact_distances(metric, q, chunk, c, dim, d + j, err);
        if (st != BS_OK) return st;
        const size_t took = bs_rerank_gate(lb + j, d + j, c, k, heap, hn);
        if (took < c) {
            *stop = j + took;
            return BS_OK;
        }
    }
    return BS_OK;
}

/* rerank_gated_array(metric, Q, dim, array, fragment_size, rowids,
 *                    lower_bounds, counts, k, kept, dists)
 *     -> (rows read, refused row id or None)
 *
 * The whole gated 1-bit rerank of a batch of nq queries (see
 * Searcher._rerank_gated) when the source holds the column as one float32
 * array (rows, dim), fragment f being rows [f * fragment_size, ...): query
 * i's counts[i] candidates (rowids[i * cap ...], lower_bounds[i * cap ...],
 * cap = len(rowids) / nq, in lower-bound order) are read straight from the
 * array, each row checked against the accepted-values rule, and taken in
 * until the gate stops; kept[i] receives how many were, dists[i * cap ...]
 * their exact distances. The stop point does not depend on how the list is
 * read, so this answers exactly like the rounds of rerank_gated. A row id
 * outside the array, or a row with a refused value, stops the call and is
 * returned (kept and dists are then partly written), for the caller to
 * have the source refuse it by name. */
static PyObject *fn_rerank_gated_array(PyObject *module, PyObject *args) {
    PyObject *metric_o, *qo, *dim_o, *ao, *fs_o, *ro, *lbo, *co, *k_o, *ko, *dO;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOO", &metric_o, &qo, &dim_o, &ao, &fs_o, &ro, &lbo,
                          &co, &k_o, &ko, &dO))
        return NULL;
    int metric;
    uint32_t dim, k;
    unsigned long long frag;
    if (enum_arg(module, metric_o, "metric", &metric) < 0 ||
        u32_arg(module, dim_o, "dim", 1, &dim) < 0 || u32_arg(module, k_o, "k", 1, &k) < 0 ||
        int_arg(module, fs_o, "fragment_size", 1, UINT64_MAX >> 32, &frag) < 0)
        return NULL;
    buf_arg b[] = {
        BUF("counts", co, 'U', 0, 0),
        BUF("Q", qo, 'f', 0, 0),
        BUF("array", ao, 'f', 0, 0),
        BUF("rowids", ro, 'U', 0, 0),
        BUF("lower_bounds", lbo, 'f', 0, 0),
        BUF("kept", ko, 'U', BUF_WRITABLE, 0),
        BUF("dists", dO, 'f', BUF_WRITABLE, 0),
    };
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    const size_t nq = buf_items(&b[0].view);
    const size_t cap = nq ? buf_items(&b[3].view) / nq : 0;
    const size_t nrows = buf_items(&b[2].view) / dim;
    const uint64_t *counts = b[0].view.buf, *rowids = b[3].view.buf;
    const float *Q = b[1].view.buf, *arr = b[2].view.buf, *lbs = b[4].view.buf;
    uint64_t *kept = b[5].view.buf;
    float *dists = b[6].view.buf;
    PyObject *result = NULL;
    float *chunk = NULL, *heap = NULL;
    uint64_t *at = NULL;
    if (check_len(module, &b[1].view, items_of(nq, dim), 1, "Q") < 0 ||
        check_len(module, &b[3].view, items_of(nq, cap), 1, "rowids") < 0 ||
        check_len(module, &b[4].view, items_of(nq, cap), 1, "lower_bounds") < 0 ||
        check_len(module, &b[6].view, items_of(nq, cap), 1, "dists") < 0 ||
        check_len(module, &b[5].view, nq, 1, "kept") < 0)
        goto out;
    for (size_t i = 0; i < nq; i++)
        if (counts[i] > cap) {
            PyErr_Format(invalid_input(module), "counts[%zu] = %llu is above %zu", i,
                         (unsigned long long)counts[i], cap);
            goto out;
        }
    chunk = PyMem_Malloc(items_of(RERANK_CHUNK, dim) * sizeof(float));
    heap = PyMem_Malloc((size_t)k * sizeof(float));
    at = PyMem_Malloc((cap ? cap : 1) * sizeof(uint64_t));
    if (chunk == NULL || heap == NULL || at == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    bs_error err;
    bs_status status = BS_OK;
    size_t reads = 0;
    uint64_t bad_row = 0;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < nq && status == BS_OK && !bad; i++) {
        const size_t n = (size_t)counts[i];
        const uint64_t *r = rowids + i * cap;
        size_t valid = n; /* candidates before the first row id outside the array */
        for (size_t t = 0; t < n; t++) {
            const uint64_t off = r[t] & 0xffffffffu, p = (r[t] >> 32) * frag + off;
            if (off >= frag || p >= nrows) {
                valid = t;
                break;
            }
            at[t] = p;
        }
        uint32_t hn = 0;
        size_t stop, gathered, refused;
        status = gate_rows((bs_metric)metric, Q + i * dim, dim, arr, at, lbs + i * cap, valid, k,
                           heap, &hn, dists + i * cap, chunk, 1, &stop, &gathered, &refused,
                           &err);
        reads += gathered;
        kept[i] = stop;
        if (refused < valid) {
            bad = 1;
            bad_row = r[refused];
        } else if (stop == valid && valid < n) {
            bad = 1; /* the gate reached a row id outside the array */
            bad_row = r[valid];
        }
    }
    Py_END_ALLOW_THREADS
    if (status != BS_OK) {
        raise_bs(module, &err);
        goto out;
    }
    if (bad)
        result = Py_BuildValue("(nK)", (Py_ssize_t)reads, (unsigned long long)bad_row);
    else
        result = Py_BuildValue("(nO)", (Py_ssize_t)reads, Py_None);
out:
    PyMem_Free(chunk);
    PyMem_Free(heap);
    PyMem_Free(at);
    bufs_release(b, NBUFS(b));
    return result;
}

/* rerank_gated(metric, Q, dim, vecs, index, lower_bounds, counts, pos, end,
 *              k, heaps, heap_n, dists, done) -> None
 *
 * One round of the gated 1-bit rerank of a batch of nq queries (see
 * Searcher._rerank_gated), so that the per-candidate loop runs here and
 * not in Python. Each query i has its candidates in lower-bound order,
 * lower_bounds[i * cap + j] (cap = len(lower_bounds) / nq), counts[i] of
 * them; pos[i] are taken in so far, with their exact distances in
 * dists[i * cap ...] and the k best of those in the max-heap
 * heaps[i * k ...] of heap_n[i] entries. This round offers candidates
 * pos[i] .. end[i] - 1 of every query with pos[i] < end[i], query after
 * query: their vectors are vecs[index[t] * dim ...] for the t-th candidate
 * offered. Each is taken in (its distance stored, pushed on the heap)
 * until bs_rerank_gate stops at one whose lower bound exceeds the k-th best
 * distance; pos[i] moves past the ones taken in, and done[i] is set when
 * the gate stopped or no candidate is left. The answer is therefore the one
 * of calling exact_distances and rerank_gate on each slice. */
static PyObject *fn_rerank_gated(PyObject *module, PyObject *args) {
    PyObject *metric_o, *qo, *dim_o, *vo, *io, *lbo, *co, *po, *eo, *k_o, *ho, *hno, *dO, *doneo;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOO", &metric_o, &qo, &dim_o, &vo, &io, &lbo, &co,
                          &po, &eo, &k_o, &ho, &hno, &dO, &doneo))
        return NULL;
    int metric;
    uint32_t dim, k;
    if (enum_arg(module, metric_o, "metric", &metric) < 0 ||
        u32_arg(module, dim_o, "dim", 1, &dim) < 0 || u32_arg(module, k_o, "k", 1, &k) < 0)
        return NULL;
    buf_arg b[] = {
        BUF("counts", co, 'U', 0, 0),
        BUF("Q", qo, 'f', 0, 0),
        BUF("vecs", vo, 'f', 0, 0),
        BUF("index", io, 'U', 0, 0),
        BUF("lower_bounds", lbo, 'f', 0, 0),
        BUF("pos", po, 'U', BUF_WRITABLE, 0),
        BUF("end", eo, 'U', 0, 0),
        BUF("heaps", ho, 'f', BUF_WRITABLE, 0),
        BUF("heap_n", hno, 'U', BUF_WRITABLE, 0),
        BUF("dists", dO, 'f', BUF_WRITABLE, 0),
        BUF("done", doneo, 'b', BUF_WRITABLE, 0),
    };
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    const size_t nq = buf_items(&b[0].view);
    const size_t cap = nq ? buf_items(&b[4].view) / nq : 0;
    const size_t nvec = buf_items(&b[2].view) / dim, nindex = buf_items(&b[3].view);
    const uint64_t *counts = b[0].view.buf, *index = b[3].view.buf, *end = b[6].view.buf;
    uint64_t *pos = b[5].view.buf, *heap_n = b[8].view.buf;
    const float *Q = b[1].view.buf, *vecs = b[2].view.buf, *lbs = b[4].view.buf;
    float *heaps = b[7].view.buf, *dists = b[9].view.buf;
    unsigned char *done = b[10].view.buf;
    PyObject *result = NULL;
    if (check_len(module, &b[1].view, items_of(nq, dim), 1, "Q") < 0 ||
        check_len(module, &b[4].view, items_of(nq, cap), 1, "lower_bounds") < 0 ||
        check_len(module, &b[9].view, items_of(nq, cap), 1, "dists") < 0 ||
        check_len(module, &b[7].view, items_of(nq, k), 1, "heaps") < 0 ||
        check_len(module, &b[5].view, nq, 1, "pos") < 0 ||
        check_len(module, &b[6].view, nq, 1, "end") < 0 ||
        check_len(module, &b[8].view, nq, 1, "heap_n") < 0 ||
        check_len(module, &b[10].view, nq, 1, "done") < 0)
        goto out;
    /* Every index is checked before anything is written. */
    size_t offered = 0;
    for (size_t i = 0; i < nq; i++) {
        if (counts[i] > cap || end[i] > counts[i] || pos[i] > end[i] || heap_n[i] > k) {
            PyErr_Format(invalid_input(module),
                         "query %zu: need pos <= end <= counts <= %zu and heap_n <= k (%u), "
                         "got pos %llu, end %llu, counts %llu, heap_n %llu",
                         i, cap, k, (unsigned long long)pos[i], (unsigned long long)end[i],
                         (unsigned long long)counts[i], (unsigned long long)heap_n[i]);
            goto out;
        }
        offered += (size_t)(end[i] - pos[i]);
    }
    if (offered != nindex) {
        PyErr_Format(invalid_input(module), "index holds %zu items, the round offers %zu",
                     nindex, offered);
        goto out;
    }
    for (size_t t = 0; t < nindex; t++)
        if (index[t] >= nvec) {
            PyErr_Format(invalid_input(module), "index[%zu] = %llu is past the %zu vectors", t,
                         (unsigned long long)index[t], nvec);
            goto out;
        }
    float *chunk = PyMem_Malloc(items_of(RERANK_CHUNK, dim) * sizeof(float));
    if (chunk == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    bs_error err;
    bs_status status = BS_OK;
    Py_BEGIN_ALLOW_THREADS
    const uint64_t *idx = index;
    for (size_t i = 0; i < nq && status == BS_OK; i++) {
        const size_t a = (size_t)pos[i], n = (size_t)(end[i] - pos[i]);
        if (n == 0) continue;
        uint32_t hn = (uint32_t)heap_n[i];
        size_t stop, gathered, refused;
        status = gate_rows((bs_metric)metric, Q + i * dim, dim, vecs, idx, lbs + i * cap + a, n,
                           k, heaps + (size_t)i * k, &hn, dists + i * cap + a, chunk, 0, &stop,
                           &gathered, &refused, &err);
        idx += n;
        heap_n[i] = hn;
        pos[i] = a + stop;
        if (stop < n || pos[i] >= counts[i]) done[i] = 1;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(chunk);
    if (status != BS_OK) {
        raise_bs(module, &err);
        goto out;
    }
    result = Py_NewRef(Py_None);
out:
    bufs_release(b, NBUFS(b));
    return result;
}

/* A candidate of top_k: its distance, then its row id, decide its place. */
typedef struct {
    float d;
    uint64_t row;
} ranked;

static int ranked_cmp(const void *pa, const void *pb) {
    const ranked *a = pa, *b = pb;
    if (a->d != b->d) return a->d < b->d ? -1 : 1;
    return (a->row > b->row) - (a->row < b->row);
}

/* top_k(rowids, dists, counts, k, out_rowids, out_dists) -> None
 *
 * For each of nq = len(counts) queries, the k smallest (distance, row id)
 * pairs among the first counts[i] of rowids[i * cap ...] and
 * dists[i * cap ...] (cap = len(rowids) / nq), in increasing order, into
 * out_rowids[i * k ...] and out_dists[i * k ...]; a query with fewer pads
 * with the row id 2**64 - 1 and +inf. The order is numpy's
 * lexsort((rowids, dists)) for finite distances, so this replaces a
 * per-query sort in Python with one call per batch. */
static PyObject *fn_top_k(PyObject *module, PyObject *args) {
    PyObject *ro, *dO, *co, *k_o, *oro, *odo;
    if (!PyArg_ParseTuple(args, "OOOOOO", &ro, &dO, &co, &k_o, &oro, &odo)) return NULL;
    uint32_t k;
    if (u32_arg(module, k_o, "k", 1, &k) < 0) return NULL;
    buf_arg b[] = {
        BUF("counts", co, 'U', 0, 0),
        BUF("rowids", ro, 'U', 0, 0),
        BUF("dists", dO, 'f', 0, 0),
        BUF("out_rowids", oro, 'U', BUF_WRITABLE, 0),
        BUF("out_dists", odo, 'f', BUF_WRITABLE, 0),
    };
    if (bufs_acquire(module, b, NBUFS(b)) < 0) return NULL;
    const size_t nq = buf_items(&b[0].view);
    const size_t cap = nq ? buf_items(&b[1].view) / nq : 0;
    const uint64_t *counts = b[0].view.buf, *rows = b[1].view.buf;
    const float *dists = b[2].view.buf;
    uint64_t *out_r = b[3].view.buf;
    float *out_d = b[4].view.buf;
    PyObject *result = NULL;
    ranked *tmp = NULL;
    if (check_len(module, &b[1].view, items_of(nq, cap), 1, "rowids") < 0 ||
        check_len(module, &b[2].view, items_of(nq, cap), 1, "dists") < 0 ||
        check_len(module, &b[3].view, items_of(nq, k), 1, "out_rowids") < 0 ||
        check_len(module, &b[4].view, items_of(nq, k), 1, "out_dists") < 0)
        goto out;
    for (size_t i = 0; i < nq; i++)
        if (counts[i] > cap) {
            PyErr_Format(invalid_input(module), "counts[%zu] = %llu is above %zu", i,
                         (unsigned long long)counts[i], cap);
            goto out;
        }
    tmp = PyMem_Malloc((cap ? cap : 1) * sizeof *tmp);
    if (tmp == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < nq; i++) {
        const size_t n = (size_t)counts[i];
        for (size_t j = 0; j < n; j++) tmp[j] = (ranked){dists[i * cap + j], rows[i * cap + j]};
        qsort(tmp, n, sizeof *tmp, ranked_cmp);
        for (size_t j = 0; j < k; j++) {
            out_r[i * k + j] = j < n ? tmp[j].row : UINT64_MAX;
            out_d[i * k + j] = j < n ? tmp[j].d : INFINITY;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
out:
    PyMem_Free(tmp);
    bufs_release(b, NBUFS(b));
    return result;
}

/* The BLAS (OpenBLAS from scipy-openblas32) keeps its own process-wide
 * thread count; a worker process that runs one task per core sets it to 1
 * so that N workers do not start N x cores BLAS threads. */

static PyObject *fn_set_blas_threads(PyObject *module, PyObject *args) {
    PyObject *n_o;
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "O", &n_o)) return NULL;
    if (int_arg(module, n_o, "threads", 1, INT_MAX, &n) < 0) return NULL;
    scipy_openblas_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *fn_simd_level(PyObject *module, PyObject *unused) {
    bs_simd_level level;
    bs_error err;
    if (bs_simd_select(&level, &err) != BS_OK) return raise_bs(module, &err);
    return PyUnicode_FromString(bs_simd_name(level));
}

static PyObject *fn_version(PyObject *module, PyObject *unused) {
    return PyLong_FromUnsignedLong(bs_version_number());
}

static PyObject *fn_segment_prefix_size(PyObject *m, PyObject *args) {
    PyObject *bo;
    if (!PyArg_ParseTuple(args, "O", &bo)) return NULL;
    buf_arg b[] = {BUF("data", bo, 'b', 0, 0)};
    if (bufs_acquire(m, b, NBUFS(b)) < 0) return NULL;
    uint64_t need = 0;
    bs_error err;
    bs_status status = bs_segment_prefix_size(b[0].view.buf, (size_t)b[0].view.len, &need, &err);
    bufs_release(b, NBUFS(b));
    if (status != BS_OK) return raise_bs(m, &err);
    return PyLong_FromUnsignedLongLong(need);
}

static PyMethodDef native_methods[] = {
    {"kmeans_train", fn_kmeans_train, METH_VARARGS,
     "kmeans_train(x, n, d, k, metric, max_iters, seed, out, threads=1)"},
    {"ivf_fingerprint", fn_ivf_fingerprint, METH_VARARGS,
     "ivf_fingerprint(centroids, k, d, metric) -> 16 bytes"},
    {"hash64", fn_hash64, METH_VARARGS, "hash64(data, seed=0) -> int"},
    {"segment_prefix_size", fn_segment_prefix_size, METH_VARARGS,
     "segment_prefix_size(first_bytes) -> bytes to read from offset 0 (see bitshard.h)"},
    {"padded_dim", fn_padded_dim, METH_VARARGS, "padded_dim(dim) -> int"},
    {"merge", fn_merge, METH_VARARGS, "merge(segments, uuid, path, flags=0)"},
    {"remap", fn_remap, METH_VARARGS,
     "remap(segments, maps, fragment_ids, fragment_rows, uuid, path, flags=0, "
     "identities=None)"},
    {"exact_distances", fn_exact_distances, METH_VARARGS,
     "exact_distances(metric, q, x, n, dim, out)"},
    {"simd_level", fn_simd_level, METH_NOARGS, "the kernel level in use"},
    {"set_blas_threads", fn_set_blas_threads, METH_VARARGS,
     "set_blas_threads(n): threads of the BLAS used by k-means and assignment"},
    {"rerank_gate", fn_rerank_gate, METH_VARARGS,
     "rerank_gate(lb, d, heap, heap_n, k) -> (stop, heap_n)"},
    {"rerank_gated", fn_rerank_gated, METH_VARARGS,
     "rerank_gated(metric, Q, dim, vecs, index, lower_bounds, counts, pos, end, k, heaps, "
     "heap_n, dists, done) -> None"},
    {"rerank_gated_array", fn_rerank_gated_array, METH_VARARGS,
     "rerank_gated_array(metric, Q, dim, array, fragment_size, rowids, lower_bounds, counts, k, "
     "kept, dists) -> (rows read, refused row id or None)"},
    {"top_k", fn_top_k, METH_VARARGS,
     "top_k(rowids, dists, counts, k, out_rowids, out_dists) -> None"},
    {"version", fn_version, METH_NOARGS, "the C library version number"},
    {NULL, NULL, 0, NULL}};

/* ----------------------------------------------------------- module init */

static int native_exec(PyObject *module) {
    native_state *st = get_state(module);
    PyObject *errors = PyImport_ImportModule("bitshard.errors");
    if (errors == NULL) return -1;
    static const struct {
        bs_status code;
        const char *name;
    } map[] = {{BS_ERR_INVALID_ARGUMENT, "InvalidInputError"},
               {BS_ERR_INVALID_DATA, "InvalidInputError"},
               {BS_ERR_IO, "BitshardError"},
               {BS_ERR_CORRUPT, "CorruptIndexError"},
               {BS_ERR_UNSUPPORTED_VERSION, "UnsupportedVersionError"},
               {BS_ERR_ARTIFACT_MISMATCH, "ArtifactMismatchError"},
               {BS_ERR_UNSUPPORTED_CPU, "UnsupportedCpuError"},
               {BS_ERR_INTERNAL, "BitshardError"}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        st->errors[map[i].code] = PyObject_GetAttrString(errors, map[i].name);
        if (st->errors[map[i].code] == NULL) {
            Py_DECREF(errors);
            return -1;
        }
    }
    Py_DECREF(errors);
    /* Python refuses what the C library would refuse only when first used. */
    if (PyModule_AddIntConstant(module, "ROTATION_MATRIX_MAX_DIM",
                                (long)BS_ROTATION_MATRIX_MAX_DIM) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "WRITE_EXTERNAL_CENTROIDS",
                                (long)BS_WRITE_EXTERNAL_CENTROIDS) < 0)
        return -1;
    PyType_Spec *specs[NUM_TYPES] = {&Rotation_spec, &Builder_spec, &Segment_spec,
                                     &Searcher_spec, &OneSearch_spec};
    for (int i = 0; i < NUM_TYPES; i++) {
        PyObject *t = PyType_FromModuleAndSpec(module, specs[i], NULL);
        if (t == NULL) return -1;
        st->types[i] = (PyTypeObject *)t;
        if (PyModule_AddType(module, (PyTypeObject *)t) < 0) return -1;
    }
    return 0;
}

static int native_traverse(PyObject *module, visitproc visit, void *arg) {
    native_state *st = get_state(module);
    for (int i = 0; i < 10; i++) Py_VISIT(st->errors[i]);
    for (int i = 0; i < NUM_TYPES; i++) Py_VISIT(st->types[i]);
    return 0;
}

static int native_clear(PyObject *module) {
    native_state *st = get_state(module);
    for (int i = 0; i < 10; i++) Py_CLEAR(st->errors[i]);
    for (int i = 0; i < NUM_TYPES; i++) Py_CLEAR(st->types[i]);
    return 0;
}

static void native_free(void *module) { native_clear((PyObject *)module); }

static PyModuleDef_Slot native_slots[] = {{Py_mod_exec, native_exec}, {0, NULL}};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "bitshard._native",
    "The C core of bitshard (thin binding; use the bitshard package).",
    sizeof(native_state),  native_methods,
    native_slots,          native_traverse,
    native_clear,          native_free};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&native_module); }
