/* The thin CPython binding of the bitshard C core.
 *
 * It checks arguments, holds buffers for as long as C keeps pointers into
 * them, releases the GIL around every long C call, and maps C status codes
 * to the exception classes of bitshard.errors (kept in module state).
 * Arrays cross as buffers: inputs are read-only C-contiguous buffers of the
 * exact dtype (never converted silently), outputs are writable buffers the
 * Python side allocates with numpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bitshard.h"

typedef struct {
    PyObject *errors[10]; /* indexed by bs_status */
    PyTypeObject *RotationType;
    PyTypeObject *BuilderType;
    PyTypeObject *SegmentType;
    PyTypeObject *SearcherType;
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

/* ---------------------------------------------------------- buffer helper */

/* kind: 'f' float32, 'u' unsigned integer of itemsize, 'b' raw bytes. */
static int get_buf(PyObject *obj, Py_buffer *view, char kind, Py_ssize_t itemsize,
                   int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    if (kind == 'b') return 0;
    const char *fmt = view->format ? view->format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    int ok;
    if (kind == 'f')
        ok = view->itemsize == 4 && strcmp(fmt, "f") == 0;
    else
        ok = view->itemsize == itemsize && fmt[1] == '\0' && strchr("BHILQN", fmt[0]);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must hold %s, got format '%s' of %zd bytes",
                     name, kind == 'f' ? "float32" : (itemsize == 8 ? "uint64" : "uint32"),
                     view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int check_len(Py_buffer *view, size_t items, const char *name) {
    if ((size_t)(view->len / (view->itemsize ? view->itemsize : 1)) < items) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd items, needs %zu", name,
                     view->len / (view->itemsize ? view->itemsize : 1), items);
        return -1;
    }
    return 0;
}

static PyObject *fingerprint_bytes(bs_fingerprint fp) {
    return PyBytes_FromStringAndSize((const char *)fp.bytes, 16);
}

/* ------------------------------------------------------------- Rotation */

typedef struct {
    PyObject_HEAD
    bs_rotation *rot;
    PyObject *module;
} RotationObject;

static int Rotation_init(RotationObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"kind", "dim", "seed", NULL};
    int kind;
    unsigned int dim;
    unsigned long long seed;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iIK", kwlist, &kind, &dim, &seed))
        return -1;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_rotation_create((bs_rotation_kind)kind, dim, seed, &self->rot, &err);
    Py_END_ALLOW_THREADS
    if (status != BS_OK) {
        raise_bs(self->module, &err);
        return -1;
    }
    return 0;
}

static void Rotation_dealloc(RotationObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    bs_rotation_free(self->rot);
    Py_XDECREF(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *Rotation_apply(RotationObject *self, PyObject *args) {
    PyObject *xo, *outo;
    Py_ssize_t n;
    unsigned int in_dim;
    if (!PyArg_ParseTuple(args, "OnIO", &xo, &n, &in_dim, &outo)) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "n must be >= 0");
    Py_buffer x, out;
    if (get_buf(xo, &x, 'f', 4, 0, "x") < 0) return NULL;
    if (get_buf(outo, &out, 'f', 4, 1, "out") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_len(&x, (size_t)n * in_dim, "x") == 0 &&
        check_len(&out, (size_t)n * bs_rotation_padded_dim(self->rot), "out") == 0) {
        bs_error err;
        bs_status status;
        Py_BEGIN_ALLOW_THREADS
        status = bs_rotation_apply(self->rot, x.buf, (size_t)n, in_dim, out.buf, &err);
        Py_END_ALLOW_THREADS
        if (status != BS_OK)
            raise_bs(self->module, &err);
        else
            result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
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

/* --------------------------------------------------------------- Builder */

typedef struct {
    PyObject_HEAD
    bs_segment_builder *b;
    PyObject *module;
    unsigned int threads;
} BuilderObject;

static int Builder_init(BuilderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dim", "num_bits", "metric", "rotation_kind", "rotation_seed",
                             "centroids", "num_partitions", "column", "uuid",
                             "fragment_ids", "fragment_rows", NULL};
    unsigned int dim, bits, nlist;
    int metric, kind;
    unsigned long long seed;
    PyObject *co, *fido, *frowo;
    const char *column;
    Py_buffer uuid;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "IIiiKOIsy*OO", kwlist, &dim, &bits, &metric,
                                     &kind, &seed, &co, &nlist, &column, &uuid, &fido,
                                     &frowo))
        return -1;
    Py_buffer cent, fid, frow;
    if (uuid.len != 16) {
        PyBuffer_Release(&uuid);
        PyErr_SetString(PyExc_ValueError, "uuid must be 16 bytes");
        return -1;
    }
    if (get_buf(co, &cent, 'f', 4, 0, "centroids") < 0) {
        PyBuffer_Release(&uuid);
        return -1;
    }
    if (get_buf(fido, &fid, 'u', 8, 0, "fragment_ids") < 0) {
        PyBuffer_Release(&uuid);
        PyBuffer_Release(&cent);
        return -1;
    }
    if (get_buf(frowo, &frow, 'u', 8, 0, "fragment_rows") < 0) {
        PyBuffer_Release(&uuid);
        PyBuffer_Release(&cent);
        PyBuffer_Release(&fid);
        return -1;
    }
    int rc = -1;
    size_t nfrag = (size_t)(fid.len / 8);
    if (check_len(&cent, (size_t)nlist * dim, "centroids") == 0 &&
        check_len(&frow, nfrag, "fragment_rows") == 0) {
        bs_segment_spec spec;
        memset(&spec, 0, sizeof spec);
        spec.dim = dim;
        spec.num_bits = bits;
        spec.metric = (bs_metric)metric;
        spec.rotation_kind = (bs_rotation_kind)kind;
        spec.rotation_seed = seed;
        spec.centroids = cent.buf;
        spec.num_partitions = nlist;
        spec.column = column;
        spec.uuid = uuid.buf;
        spec.fragment_ids = fid.buf;
        spec.fragment_rows = frow.buf;
        spec.num_fragments = (uint32_t)nfrag;
        bs_error err;
        bs_status status;
        Py_BEGIN_ALLOW_THREADS
        status = bs_builder_create(&spec, &self->b, &err);
        Py_END_ALLOW_THREADS
        self->threads = 1;
        if (status != BS_OK)
            raise_bs(self->module, &err);
        else
            rc = 0;
    }
    PyBuffer_Release(&uuid);
    PyBuffer_Release(&cent);
    PyBuffer_Release(&fid);
    PyBuffer_Release(&frow);
    return rc;
}

static void Builder_dealloc(BuilderObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    bs_builder_free(self->b);
    Py_XDECREF(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *Builder_add(BuilderObject *self, PyObject *args) {
    PyObject *xo, *offo;
    Py_ssize_t n;
    unsigned int fidx, dim;
    if (!PyArg_ParseTuple(args, "OnIIO", &xo, &n, &dim, &fidx, &offo)) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "n must be >= 0");
    Py_buffer x, off;
    if (get_buf(xo, &x, 'f', 4, 0, "x") < 0) return NULL;
    if (get_buf(offo, &off, 'u', 4, 0, "offsets") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_len(&x, (size_t)n * dim, "x") == 0 && check_len(&off, (size_t)n, "offsets") == 0) {
        bs_error err;
        bs_status status;
        /* As in kmeans_train: our threads, a single-threaded BLAS. */
        int blas = self->threads > 1 ? scipy_openblas_get_num_threads() : 0;
        Py_BEGIN_ALLOW_THREADS
        if (blas > 1) scipy_openblas_set_num_threads(1);
        status = bs_builder_add(self->b, x.buf, (size_t)n, fidx, off.buf, &err);
        if (blas > 1) scipy_openblas_set_num_threads(blas);
        Py_END_ALLOW_THREADS
        if (status != BS_OK)
            raise_bs(self->module, &err);
        else
            result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&off);
    return result;
}

static PyObject *Builder_write(BuilderObject *self, PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_builder_write(self->b, path, &err);
    Py_END_ALLOW_THREADS
    if (status != BS_OK) return raise_bs(self->module, &err);
    Py_RETURN_NONE;
}

static PyObject *Builder_set_threads(BuilderObject *self, PyObject *args) {
    unsigned int n;
    if (!PyArg_ParseTuple(args, "I", &n)) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %u", n);
    bs_builder_set_threads(self->b, n);
    self->threads = n;
    Py_RETURN_NONE;
}

static PyMethodDef Builder_methods[] = {
    {"set_threads", (PyCFunction)Builder_set_threads, METH_VARARGS,
     "set_threads(n): threads for each later add (same segment for every n)."},
    {"add", (PyCFunction)Builder_add, METH_VARARGS,
     "add(x, n, dim, fragment_index, offsets): encode n float32 rows."},
    {"write", (PyCFunction)Builder_write, METH_VARARGS, "write(path): write the segment."},
    {NULL, NULL, 0, NULL}};

/* --------------------------------------------------------------- Segment */

typedef struct {
    PyObject_HEAD
    bs_segment *seg;
    Py_buffer buf; /* held until dealloc: the segment points into it */
    int has_buf;
    PyObject *module;
} SegmentObject;

static int Segment_init(SegmentObject *self, PyObject *args, PyObject *kw) {
    PyObject *bo;
    if (!PyArg_ParseTuple(args, "O", &bo)) return -1;
    if (get_buf(bo, &self->buf, 'b', 1, 0, "data") < 0) return -1;
    self->has_buf = 1;
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_segment_open(self->buf.buf, (size_t)self->buf.len, &self->seg, &err);
    Py_END_ALLOW_THREADS
    if (status != BS_OK) {
        raise_bs(self->module, &err);
        return -1;
    }
    return 0;
}

static void Segment_dealloc(SegmentObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    bs_segment_free(self->seg);
    if (self->has_buf) PyBuffer_Release(&self->buf);
    Py_XDECREF(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *Segment_info(SegmentObject *self, PyObject *unused) {
    bs_segment_info in;
    bs_segment_get_info(self->seg, &in);
    return Py_BuildValue(
        "{s:I,s:I,s:I,s:I,s:i,s:i,s:K,s:I,s:I,s:K,s:y#,s:N,s:N,s:s}", "format_version",
        in.format_version, "dim", in.dim, "padded_dim", in.padded_dim, "num_bits",
        in.num_bits, "metric", (int)in.metric, "rotation_kind", (int)in.rotation_kind,
        "rotation_seed", (unsigned long long)in.rotation_seed, "num_partitions",
        in.num_partitions, "num_fragments", in.num_fragments, "num_rows",
        (unsigned long long)in.num_rows, "uuid", (const char *)in.uuid, (Py_ssize_t)16,
        "rotation_fingerprint", fingerprint_bytes(in.rotation_fingerprint),
        "ivf_fingerprint", fingerprint_bytes(in.ivf_fingerprint), "column", in.column);
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

static PyObject *Segment_centroids(SegmentObject *self, PyObject *args) {
    PyObject *outo;
    if (!PyArg_ParseTuple(args, "O", &outo)) return NULL;
    bs_segment_info in;
    bs_segment_get_info(self->seg, &in);
    Py_buffer out;
    if (get_buf(outo, &out, 'f', 4, 1, "out") < 0) return NULL;
    size_t n = (size_t)in.num_partitions * in.dim;
    if (check_len(&out, n, "out") < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    memcpy(out.buf, bs_segment_centroids(self->seg), n * sizeof(float));
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyMethodDef Segment_methods[] = {
    {"info", (PyCFunction)Segment_info, METH_NOARGS, "header fields as a dict"},
    {"fragments", (PyCFunction)Segment_fragments, METH_NOARGS,
     "[(fragment_id, physical_rows)] in table order"},
    {"centroids", (PyCFunction)Segment_centroids, METH_VARARGS,
     "centroids(out): copy num_partitions x dim float32 into out"},
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
        if (!PyObject_TypeCheck(o, st->SegmentType)) {
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
    self->cand = bs_candidates_new();
    if (self->cand == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Searcher_dealloc(SearcherObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    bs_searcher_free(self->s);
    bs_candidates_free(self->cand);
    Py_XDECREF(self->segments);
    Py_XDECREF(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* The search parameters from the call's arguments; a filter buffer is NULL
 * when the caller passed None. */
static void set_params(bs_search_params *p, unsigned k, unsigned nprobes, float eps0,
                       unsigned refine, const Py_buffer *mask, const Py_buffer *allow,
                       const Py_buffer *frags, const Py_buffer *denied) {
    memset(p, 0, sizeof *p);
    p->k = k;
    p->nprobes = nprobes;
    p->eps0 = eps0;
    p->refine_factor = refine;
    p->segment_mask = mask ? mask->buf : NULL;
    p->allowed_rowids = allow ? allow->buf : NULL;
    p->num_allowed = allow ? (size_t)(allow->len / 8) : 0;
    p->allowed_fragments = frags ? frags->buf : NULL;
    p->num_allowed_fragments = frags ? (size_t)(frags->len / 8) : 0;
    p->denied_rowids = denied ? denied->buf : NULL;
    p->num_denied = denied ? (size_t)(denied->len / 8) : 0;
}

static void stats_add(bs_search_stats *acc, const bs_search_stats *st) {
    acc->partitions_probed += st->partitions_probed;
    acc->codes_scanned += st->codes_scanned;
    acc->codes_stage2 += st->codes_stage2;
    acc->candidates += st->candidates;
}

/* Adds the counts to a caller's uint64[4] (partitions, codes, stage 2,
 * candidates). */
static void stats_add_u64(uint64_t *acc, const bs_search_stats *st) {
    acc[0] += st->partitions_probed;
    acc[1] += st->codes_scanned;
    acc[2] += st->codes_stage2;
    acc[3] += st->candidates;
}

/* search(q, k, nprobes, eps0, refine_factor, segment_mask, allowed_rowids,
 *        allowed_fragments, denied_rowids, out_rowids, out_estimates,
 *        out_lower_bounds, stats) -> n
 *
 * One query into caller-owned arrays: the hot path of a prepared search, so
 * nothing is allocated per call. The four filters may be None; stats is
 * None or a uint64[4] that the call adds its counts to. Returns the number
 * of candidates; only the first len(out_rowids) are copied, so a caller
 * whose arrays were short calls again with longer ones. */
static PyObject *Searcher_search(SearcherObject *self, PyObject *args) {
    PyObject *o[13];
    unsigned int k, nprobes, refine;
    float eps0;
    if (!PyArg_ParseTuple(args, "OIIfIOOOOOOOO", &o[0], &k, &nprobes, &eps0, &refine, &o[5],
                          &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12]))
        return NULL;
    /* buffers: q, mask, allowed, frags, denied, rowids, est, lb, stats */
    static const int arg_of[9] = {0, 5, 6, 7, 8, 9, 10, 11, 12};
    static const char kind[9] = {'f', 'b', 'u', 'u', 'u', 'u', 'f', 'f', 'u'};
    static const int writable[9] = {0, 0, 0, 0, 0, 1, 1, 1, 1};
    static const char *const names[9] = {"q", "segment_mask", "allowed_rowids",
                                         "allowed_fragments", "denied_rowids", "out_rowids",
                                         "out_estimates", "out_lower_bounds", "stats"};
    Py_buffer buf[9];
    int got[9] = {0};
    PyObject *result = NULL;
    for (int i = 0; i < 9; i++) {
        PyObject *obj = o[arg_of[i]];
        if (obj == Py_None && i != 0 && i != 5 && i != 6) continue;
        if (get_buf(obj, &buf[i], kind[i], 8, writable[i], names[i]) < 0) goto done;
        got[i] = 1;
    }
    bs_segment_info in;
    bs_segment_get_info(((SegmentObject *)PyTuple_GET_ITEM(self->segments, 0))->seg, &in);
    if (check_len(&buf[0], in.dim, "q") < 0) goto done;
    if (got[1] && check_len(&buf[1], (size_t)PyTuple_GET_SIZE(self->segments),
                            "segment_mask") < 0)
        goto done;
    if (got[8] && check_len(&buf[8], 4, "stats") < 0) goto done;
    size_t cap = (size_t)(buf[5].len / 8);
    if ((size_t)(buf[6].len / 4) < cap) cap = (size_t)(buf[6].len / 4);
    if (got[7] && (size_t)(buf[7].len / 4) < cap) cap = (size_t)(buf[7].len / 4);

    bs_search_params p;
    set_params(&p, k, nprobes, eps0, refine, got[1] ? &buf[1] : NULL, got[2] ? &buf[2] : NULL,
               got[3] ? &buf[3] : NULL, got[4] ? &buf[4] : NULL);

    /* The object's scratch serves one call at a time; a concurrent caller
     * (another Python thread, the GIL released below) gets its own. The flag
     * is read and set under the GIL. */
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
    bs_search_stats stats;
    bs_error err;
    bs_status status;
    size_t n = 0;
    Py_BEGIN_ALLOW_THREADS
    status = bs_search(self->s, buf[0].buf, &p, c, &stats, &err);
    if (status == BS_OK) {
        n = bs_candidates_size(c);
        size_t m = n < cap ? n : cap;
        memcpy(buf[5].buf, bs_candidates_rowids(c), m * sizeof(uint64_t));
        memcpy(buf[6].buf, bs_candidates_estimates(c), m * sizeof(float));
        if (got[7]) memcpy(buf[7].buf, bs_candidates_lower_bounds(c), m * sizeof(float));
    }
    Py_END_ALLOW_THREADS
    if (own)
        bs_candidates_free(c);
    else
        self->busy = 0;
    if (status != BS_OK) {
        raise_bs(self->module, &err);
        goto done;
    }
    if (got[8]) stats_add_u64(buf[8].buf, &stats);
    result = PyLong_FromSize_t(n);
done:
    for (int i = 0; i < 9; i++)
        if (got[i]) PyBuffer_Release(&buf[i]);
    return result;
}

/* ----------------------------------------------------- batched search */

typedef struct {
    uint64_t *rowids;
    float *est;
    float *lb;
    size_t n;
} query_result;

typedef struct {
    const bs_searcher *s;
    const float *Q;
    size_t nq;
    uint32_t dim;
    bs_search_params params;
    query_result *results;
    /* search_batch_into: results go straight into caller arrays of cap
     * entries per query (results is then NULL) */
    uint64_t *out_rowids;
    float *out_est;
    uint64_t *out_counts;
    size_t cap;
    size_t next; /* guarded by lock */
    pthread_mutex_t lock;
    bs_status status;
    bs_error err;
    bs_search_stats stats;
} batch_job;

static void *batch_worker(void *arg) {
    batch_job *job = arg;
    bs_candidates *c = bs_candidates_new();
    bs_search_stats local;
    memset(&local, 0, sizeof local);
    bs_status status = c ? BS_OK : BS_ERR_NO_MEMORY;
    bs_error err;
    err.code = BS_OK;
    err.message[0] = '\0';
    for (;;) {
        size_t qi;
        pthread_mutex_lock(&job->lock);
        qi = job->status == BS_OK && status == BS_OK ? job->next++ : job->nq;
        pthread_mutex_unlock(&job->lock);
        if (qi >= job->nq) break;
        bs_search_stats st;
        status = bs_search(job->s, job->Q + qi * job->dim, &job->params, c, &st, &err);
        if (status != BS_OK) break;
        stats_add(&local, &st);
        size_t n = bs_candidates_size(c);
        if (job->out_rowids != NULL) {
            size_t m = n < job->cap ? n : job->cap;
            memcpy(job->out_rowids + qi * job->cap, bs_candidates_rowids(c), m * sizeof(uint64_t));
            memcpy(job->out_est + qi * job->cap, bs_candidates_estimates(c), m * sizeof(float));
            job->out_counts[qi] = n;
            continue;
        }
        query_result *r = &job->results[qi];
        r->rowids = malloc((n ? n : 1) * sizeof(uint64_t));
        r->est = malloc((n ? n : 1) * sizeof(float));
        r->lb = malloc((n ? n : 1) * sizeof(float));
        if (r->rowids == NULL || r->est == NULL || r->lb == NULL) {
            status = BS_ERR_NO_MEMORY;
            break;
        }
        memcpy(r->rowids, bs_candidates_rowids(c), n * sizeof(uint64_t));
        memcpy(r->est, bs_candidates_estimates(c), n * sizeof(float));
        memcpy(r->lb, bs_candidates_lower_bounds(c), n * sizeof(float));
        r->n = n;
    }
    bs_candidates_free(c);
    pthread_mutex_lock(&job->lock);
    if (status != BS_OK && job->status == BS_OK) {
        job->status = status;
        job->err = err;
        if (status == BS_ERR_NO_MEMORY) snprintf(job->err.message, BS_ERROR_MESSAGE_MAX, "out of memory");
        job->err.code = status;
    }
    stats_add(&job->stats, &local);
    pthread_mutex_unlock(&job->lock);
    return NULL;
}

/* Runs a prepared job on up to nthreads threads (never more than queries)
 * with the GIL released; a thread that cannot start leaves its share to
 * the others, or to this thread. */
static void run_batch(batch_job *job, unsigned nthreads) {
    job->status = BS_OK;
    pthread_mutex_init(&job->lock, NULL);
    Py_BEGIN_ALLOW_THREADS
    if (nthreads == 1 || job->nq < 2) {
        batch_worker(job);
    } else {
        pthread_t tids[256];
        unsigned started = 0;
        for (; started < nthreads && started < job->nq; started++)
            if (pthread_create(&tids[started], NULL, batch_worker, job) != 0) break;
        if (started == 0) batch_worker(job);
        for (unsigned i = 0; i < started; i++) pthread_join(tids[i], NULL);
    }
    Py_END_ALLOW_THREADS
    pthread_mutex_destroy(&job->lock);
}

/* search_batch(Q, nq, k, nprobes, eps0, refine_factor, segment_mask, allowed_rowids,
 *              allowed_fragments, num_threads)
 * -> ([(rowids bytes, estimates bytes)] per query, stats tuple) */
static PyObject *Searcher_search_batch(SearcherObject *self, PyObject *args) {
    PyObject *qo, *masko, *allowo, *fragso, *deniedo = Py_None;
    Py_ssize_t nq;
    unsigned int k, nprobes, refine, nthreads;
    float eps0;
    if (!PyArg_ParseTuple(args, "OnIIfIOOOI|O", &qo, &nq, &k, &nprobes, &eps0, &refine, &masko,
                          &allowo, &fragso, &nthreads, &deniedo))
        return NULL;
    if (nq < 0) return PyErr_Format(PyExc_ValueError, "nq must be >= 0");
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    Py_buffer q, mask, allow, frags, denied;
    int has_mask = masko != Py_None, has_allow = allowo != Py_None,
        has_frags = fragso != Py_None;
    int got_q = 0, got_mask = 0, got_allow = 0, got_frags = 0, got_denied = 0;
    PyObject *result = NULL;
    query_result *results = NULL;
    bs_segment_info in;
    bs_segment_get_info(((SegmentObject *)PyTuple_GET_ITEM(self->segments, 0))->seg, &in);
    if (get_buf(qo, &q, 'f', 4, 0, "Q") < 0) goto done;
    got_q = 1;
    if (has_mask) {
        if (get_buf(masko, &mask, 'b', 1, 0, "segment_mask") < 0) goto done;
        got_mask = 1;
        if (check_len(&mask, (size_t)PyTuple_GET_SIZE(self->segments), "segment_mask") < 0)
            goto done;
    }
    if (has_allow) {
        if (get_buf(allowo, &allow, 'u', 8, 0, "allowed_rowids") < 0) goto done;
        got_allow = 1;
    }
    if (has_frags) {
        if (get_buf(fragso, &frags, 'u', 8, 0, "allowed_fragments") < 0) goto done;
        got_frags = 1;
    }
    if (deniedo != Py_None) {
        if (get_buf(deniedo, &denied, 'u', 8, 0, "denied_rowids") < 0) goto done;
        got_denied = 1;
    }
    if (check_len(&q, (size_t)nq * in.dim, "Q") < 0) goto done;
    results = calloc((size_t)(nq ? nq : 1), sizeof *results);
    if (results == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    batch_job job;
    memset(&job, 0, sizeof job);
    job.s = self->s;
    job.Q = q.buf;
    job.nq = (size_t)nq;
    job.dim = in.dim;
    set_params(&job.params, k, nprobes, eps0, refine, got_mask ? &mask : NULL,
               got_allow ? &allow : NULL, got_frags ? &frags : NULL,
               got_denied ? &denied : NULL);
    job.results = results;
    run_batch(&job, nthreads);
    if (job.status != BS_OK) {
        raise_bs(self->module, &job.err);
        goto done;
    }
    PyObject *list = PyList_New(nq);
    if (list == NULL) goto done;
    for (Py_ssize_t i = 0; i < nq; i++) {
        PyObject *t = Py_BuildValue("(y#y#y#)", (const char *)results[i].rowids,
                                    (Py_ssize_t)(results[i].n * 8), (const char *)results[i].est,
                                    (Py_ssize_t)(results[i].n * 4), (const char *)results[i].lb,
                                    (Py_ssize_t)(results[i].n * 4));
        if (t == NULL) {
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, i, t);
    }
    result = Py_BuildValue("(N(KKKK))", list, (unsigned long long)job.stats.partitions_probed,
                           (unsigned long long)job.stats.codes_scanned,
                           (unsigned long long)job.stats.codes_stage2,
                           (unsigned long long)job.stats.candidates);
done:
    if (results) {
        for (Py_ssize_t i = 0; i < nq; i++) {
            free(results[i].rowids);
            free(results[i].est);
            free(results[i].lb);
        }
        free(results);
    }
    if (got_q) PyBuffer_Release(&q);
    if (got_mask) PyBuffer_Release(&mask);
    if (got_allow) PyBuffer_Release(&allow);
    if (got_frags) PyBuffer_Release(&frags);
    if (got_denied) PyBuffer_Release(&denied);
    return result;
}

/* search_batch_into(Q, nq, k, nprobes, eps0, refine_factor, segment_mask,
 *                   allowed_rowids, allowed_fragments, num_threads, denied_rowids,
 *                   out_rowids, out_estimates, out_counts, stats) -> None
 *
 * The batch without per-query objects: query i's first min(n_i, cap)
 * candidates go to out_rowids[i * cap ...] and out_estimates[i * cap ...]
 * (cap = len(out_rowids) / nq), n_i to out_counts[i]; stats (uint64[4] or
 * None) accumulates the counts. */
static PyObject *Searcher_search_batch_into(SearcherObject *self, PyObject *args) {
    PyObject *o[7], *ro, *eo, *co, *so;
    Py_ssize_t nq;
    unsigned int k, nprobes, refine, nthreads;
    float eps0;
    if (!PyArg_ParseTuple(args, "OnIIfIOOOIOOOOO", &o[0], &nq, &k, &nprobes, &eps0, &refine,
                          &o[1], &o[2], &o[3], &nthreads, &o[4], &ro, &eo, &co, &so))
        return NULL;
    if (nq < 0) return PyErr_Format(PyExc_ValueError, "nq must be >= 0");
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    /* buffers: Q, mask, allowed, frags, denied, rowids, est, counts, stats */
    PyObject *objs[9] = {o[0], o[1], o[2], o[3], o[4], ro, eo, co, so};
    static const char kind[9] = {'f', 'b', 'u', 'u', 'u', 'u', 'f', 'u', 'u'};
    static const int writable[9] = {0, 0, 0, 0, 0, 1, 1, 1, 1};
    static const char *const names[9] = {"Q", "segment_mask", "allowed_rowids",
                                         "allowed_fragments", "denied_rowids", "out_rowids",
                                         "out_estimates", "out_counts", "stats"};
    Py_buffer buf[9];
    int got[9] = {0};
    PyObject *result = NULL;
    for (int i = 0; i < 9; i++) {
        if (objs[i] == Py_None && ((i >= 1 && i <= 4) || i == 8)) continue;
        if (get_buf(objs[i], &buf[i], kind[i], 8, writable[i], names[i]) < 0) goto done;
        got[i] = 1;
    }
    bs_segment_info in;
    bs_segment_get_info(((SegmentObject *)PyTuple_GET_ITEM(self->segments, 0))->seg, &in);
    if (check_len(&buf[0], (size_t)nq * in.dim, "Q") < 0) goto done;
    if (got[1] && check_len(&buf[1], (size_t)PyTuple_GET_SIZE(self->segments),
                            "segment_mask") < 0)
        goto done;
    if (check_len(&buf[7], (size_t)nq, "out_counts") < 0) goto done;
    if (got[8] && check_len(&buf[8], 4, "stats") < 0) goto done;
    size_t cap = nq ? (size_t)(buf[5].len / 8) / (size_t)nq : 0;
    if (nq && (size_t)(buf[6].len / 4) < cap * (size_t)nq) {
        PyErr_Format(PyExc_ValueError, "out_estimates holds fewer entries than out_rowids");
        goto done;
    }
    batch_job job;
    memset(&job, 0, sizeof job);
    job.s = self->s;
    job.Q = buf[0].buf;
    job.nq = (size_t)nq;
    job.dim = in.dim;
    set_params(&job.params, k, nprobes, eps0, refine, got[1] ? &buf[1] : NULL,
               got[2] ? &buf[2] : NULL, got[3] ? &buf[3] : NULL, got[4] ? &buf[4] : NULL);
    job.out_rowids = buf[5].buf;
    job.out_est = buf[6].buf;
    job.out_counts = buf[7].buf;
    job.cap = cap;
    run_batch(&job, nthreads);
    if (job.status != BS_OK) {
        raise_bs(self->module, &job.err);
        goto done;
    }
    if (got[8]) stats_add_u64(buf[8].buf, &job.stats);
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < 9; i++)
        if (got[i]) PyBuffer_Release(&buf[i]);
    return result;
}

static PyMethodDef Searcher_methods[] = {
    {"search", (PyCFunction)Searcher_search, METH_VARARGS,
     "search(q, k, nprobes, eps0, refine_factor, segment_mask, allowed_rowids, "
     "allowed_fragments, denied_rowids, out_rowids, out_estimates, out_lower_bounds, "
     "stats) -> number of candidates"},
    {"search_batch_into", (PyCFunction)Searcher_search_batch_into, METH_VARARGS,
     "search_batch_into(Q, nq, k, nprobes, eps0, refine_factor, segment_mask, allowed_rowids, "
     "allowed_fragments, num_threads, denied_rowids, out_rowids, out_estimates, out_counts, "
     "stats) -> None"},
    {"search_batch", (PyCFunction)Searcher_search_batch, METH_VARARGS,
     "search_batch(Q, nq, k, nprobes, eps0, refine_factor, segment_mask, allowed_rowids, "
     "allowed_fragments, num_threads) -> ([(rowids, estimates, lower_bounds)], stats)"},
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
    PyObject *xo, *outo;
    Py_ssize_t n;
    unsigned int d, k, iters;
    int metric;
    unsigned long long seed;
    unsigned int threads = 1;
    if (!PyArg_ParseTuple(args, "OnIIiIKO|I", &xo, &n, &d, &k, &metric, &iters, &seed, &outo,
                          &threads))
        return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "n must be >= 0");
    Py_buffer x, out;
    if (get_buf(xo, &x, 'f', 4, 0, "x") < 0) return NULL;
    if (get_buf(outo, &out, 'f', 4, 1, "out") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_len(&x, (size_t)n * d, "x") == 0 && check_len(&out, (size_t)k * d, "out") == 0) {
        bs_error err;
        bs_status status;
        /* Our threads each run the BLAS on their own rows: its own pool
         * would only spin against them (see bs_kmeans_train_mt). The count
         * is process-wide; another thread's call in between is merely
         * slower, never wrong. */
        int blas = threads > 1 ? scipy_openblas_get_num_threads() : 0;
        Py_BEGIN_ALLOW_THREADS
        if (blas > 1) scipy_openblas_set_num_threads(1);
        status = bs_kmeans_train_mt(x.buf, (size_t)n, d, k, (bs_metric)metric, iters, seed,
                                    threads, out.buf, &err);
        if (blas > 1) scipy_openblas_set_num_threads(blas);
        Py_END_ALLOW_THREADS
        if (status != BS_OK)
            raise_bs(module, &err);
        else
            result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *fn_ivf_assign(PyObject *module, PyObject *args) {
    PyObject *co, *xo, *ao;
    unsigned int k, d;
    int metric;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OIIiOnO", &co, &k, &d, &metric, &xo, &n, &ao)) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "n must be >= 0");
    Py_buffer c, x, a;
    if (get_buf(co, &c, 'f', 4, 0, "centroids") < 0) return NULL;
    if (get_buf(xo, &x, 'f', 4, 0, "x") < 0) {
        PyBuffer_Release(&c);
        return NULL;
    }
    if (get_buf(ao, &a, 'u', 4, 1, "assign") < 0) {
        PyBuffer_Release(&c);
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_len(&c, (size_t)k * d, "centroids") == 0 &&
        check_len(&x, (size_t)n * d, "x") == 0 && check_len(&a, (size_t)n, "assign") == 0) {
        bs_error err;
        bs_status status;
        Py_BEGIN_ALLOW_THREADS
        status = bs_ivf_assign(c.buf, k, d, (bs_metric)metric, x.buf, (size_t)n, a.buf, NULL,
                               &err);
        Py_END_ALLOW_THREADS
        if (status != BS_OK)
            raise_bs(module, &err);
        else
            result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&c);
    PyBuffer_Release(&x);
    PyBuffer_Release(&a);
    return result;
}

static PyObject *fn_ivf_fingerprint(PyObject *module, PyObject *args) {
    PyObject *co;
    unsigned int k, d;
    int metric;
    if (!PyArg_ParseTuple(args, "OIIi", &co, &k, &d, &metric)) return NULL;
    Py_buffer c;
    if (get_buf(co, &c, 'f', 4, 0, "centroids") < 0) return NULL;
    PyObject *r = NULL;
    if (check_len(&c, (size_t)k * d, "centroids") == 0)
        r = fingerprint_bytes(bs_ivf_fingerprint(c.buf, k, d, (bs_metric)metric));
    PyBuffer_Release(&c);
    return r;
}

static PyObject *fn_hash64(PyObject *module, PyObject *args) {
    Py_buffer b;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &b, &seed)) return NULL;
    uint64_t h;
    Py_BEGIN_ALLOW_THREADS
    h = bs_hash64(b.buf, (size_t)b.len, seed);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *fn_padded_dim(PyObject *module, PyObject *args) {
    unsigned int d;
    if (!PyArg_ParseTuple(args, "I", &d)) return NULL;
    return PyLong_FromUnsignedLong(bs_padded_dim(d));
}

static PyObject *fn_check_compatible(PyObject *module, PyObject *args) {
    PyObject *a, *b;
    if (!PyArg_ParseTuple(args, "OO", &a, &b)) return NULL;
    native_state *st = get_state(module);
    if (!PyObject_TypeCheck(a, st->SegmentType) || !PyObject_TypeCheck(b, st->SegmentType))
        return PyErr_Format(PyExc_TypeError, "check_compatible takes two Segments");
    bs_error err;
    if (bs_segment_check_compatible(((SegmentObject *)a)->seg, ((SegmentObject *)b)->seg,
                                    &err) != BS_OK)
        return raise_bs(module, &err);
    Py_RETURN_NONE;
}

static PyObject *fn_merge(PyObject *module, PyObject *args) {
    PyObject *seq;
    Py_buffer uuid;
    const char *path;
    if (!PyArg_ParseTuple(args, "Oy*s", &seq, &uuid, &path)) return NULL;
    if (uuid.len != 16) {
        PyBuffer_Release(&uuid);
        return PyErr_Format(PyExc_ValueError, "uuid must be 16 bytes");
    }
    const bs_segment **arr;
    Py_ssize_t n;
    if (segments_from_seq(module, seq, &arr, &n) < 0) {
        PyBuffer_Release(&uuid);
        return NULL;
    }
    bs_error err;
    bs_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bs_segment_merge(arr, (size_t)n, uuid.buf, path, &err);
    Py_END_ALLOW_THREADS
    PyMem_Free(arr);
    PyBuffer_Release(&uuid);
    if (status != BS_OK) return raise_bs(module, &err);
    Py_RETURN_NONE;
}

static PyObject *fn_exact_distances(PyObject *module, PyObject *args) {
    int metric;
    PyObject *qo, *xo, *outo;
    Py_ssize_t n;
    unsigned int dim;
    if (!PyArg_ParseTuple(args, "iOOnIO", &metric, &qo, &xo, &n, &dim, &outo)) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "n must be >= 0");
    Py_buffer q, x, out;
    if (get_buf(qo, &q, 'f', 4, 0, "q") < 0) return NULL;
    if (get_buf(xo, &x, 'f', 4, 0, "x") < 0) {
        PyBuffer_Release(&q);
        return NULL;
    }
    if (get_buf(outo, &out, 'f', 4, 1, "out") < 0) {
        PyBuffer_Release(&q);
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_len(&q, dim, "q") == 0 && check_len(&x, (size_t)n * dim, "x") == 0 &&
        check_len(&out, (size_t)n, "out") == 0) {
        bs_error err;
        bs_status status;
        Py_BEGIN_ALLOW_THREADS
        status = bs_exact_distances((bs_metric)metric, q.buf, x.buf, (size_t)n, dim, out.buf,
                                    &err);
        Py_END_ALLOW_THREADS
        if (status != BS_OK)
            raise_bs(module, &err);
        else
            result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

/* rerank_gate(lb, d, heap, heap_n, k) -> (stop, heap_n); heap is a
 * writable float32 buffer of k entries carried across calls. */
static PyObject *fn_rerank_gate(PyObject *module, PyObject *args) {
    PyObject *lbo, *dO, *heapo;
    unsigned int heap_n, k;
    if (!PyArg_ParseTuple(args, "OOOII", &lbo, &dO, &heapo, &heap_n, &k)) return NULL;
    Py_buffer lb, d, heap;
    if (get_buf(lbo, &lb, 'f', 4, 0, "lb") < 0) return NULL;
    if (get_buf(dO, &d, 'f', 4, 0, "d") < 0) {
        PyBuffer_Release(&lb);
        return NULL;
    }
    if (get_buf(heapo, &heap, 'f', 4, 1, "heap") < 0) {
        PyBuffer_Release(&lb);
        PyBuffer_Release(&d);
        return NULL;
    }
    PyObject *r = NULL;
    size_t n = (size_t)(lb.len / 4);
    if (k == 0 || heap_n > k) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= heap_n <= k and k >= 1");
    } else if (check_len(&d, n, "d") == 0 && check_len(&heap, k, "heap") == 0) {
        uint32_t hn = heap_n;
        size_t stop = bs_rerank_gate(lb.buf, d.buf, n, k, heap.buf, &hn);
        r = Py_BuildValue("(nI)", (Py_ssize_t)stop, hn);
    }
    PyBuffer_Release(&lb);
    PyBuffer_Release(&d);
    PyBuffer_Release(&heap);
    return r;
}

/* The BLAS (OpenBLAS from scipy-openblas32) keeps its own process-wide
 * thread count; a worker process that runs one task per core sets it to 1
 * so that N workers do not start N x cores BLAS threads. */

static PyObject *fn_set_blas_threads(PyObject *module, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %d", n);
    scipy_openblas_set_num_threads(n);
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

static PyMethodDef native_methods[] = {
    {"kmeans_train", fn_kmeans_train, METH_VARARGS,
     "kmeans_train(x, n, d, k, metric, max_iters, seed, out, threads=1)"},
    {"ivf_assign", fn_ivf_assign, METH_VARARGS,
     "ivf_assign(centroids, k, d, metric, x, n, assign_out)"},
    {"ivf_fingerprint", fn_ivf_fingerprint, METH_VARARGS,
     "ivf_fingerprint(centroids, k, d, metric) -> 16 bytes"},
    {"hash64", fn_hash64, METH_VARARGS, "hash64(data, seed=0) -> int"},
    {"padded_dim", fn_padded_dim, METH_VARARGS, "padded_dim(dim) -> int"},
    {"check_compatible", fn_check_compatible, METH_VARARGS,
     "check_compatible(a, b): raise ArtifactMismatchError naming what differs"},
    {"merge", fn_merge, METH_VARARGS, "merge(segments, uuid, path)"},
    {"exact_distances", fn_exact_distances, METH_VARARGS,
     "exact_distances(metric, q, x, n, dim, out)"},
    {"simd_level", fn_simd_level, METH_NOARGS, "the kernel level in use"},
    {"set_blas_threads", fn_set_blas_threads, METH_VARARGS,
     "set_blas_threads(n): threads of the BLAS used by k-means and assignment"},
    {"rerank_gate", fn_rerank_gate, METH_VARARGS,
     "rerank_gate(lb, d, heap, heap_n, k) -> (stop, heap_n)"},
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
    PyType_Spec *specs[] = {&Rotation_spec, &Builder_spec, &Segment_spec, &Searcher_spec};
    PyTypeObject **slots[] = {&st->RotationType, &st->BuilderType, &st->SegmentType,
                              &st->SearcherType};
    for (int i = 0; i < 4; i++) {
        PyObject *t = PyType_FromModuleAndSpec(module, specs[i], NULL);
        if (t == NULL) return -1;
        *slots[i] = (PyTypeObject *)t;
        if (PyModule_AddType(module, (PyTypeObject *)t) < 0) return -1;
    }
    return 0;
}

static int native_traverse(PyObject *module, visitproc visit, void *arg) {
    native_state *st = get_state(module);
    for (int i = 0; i < 10; i++) Py_VISIT(st->errors[i]);
    Py_VISIT(st->RotationType);
    Py_VISIT(st->BuilderType);
    Py_VISIT(st->SegmentType);
    Py_VISIT(st->SearcherType);
    return 0;
}

static int native_clear(PyObject *module) {
    native_state *st = get_state(module);
    for (int i = 0; i < 10; i++) Py_CLEAR(st->errors[i]);
    Py_CLEAR(st->RotationType);
    Py_CLEAR(st->BuilderType);
    Py_CLEAR(st->SegmentType);
    Py_CLEAR(st->SearcherType);
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
