/* Native inner loop of quadmix_udfs.bpe_fast for files whose only pre-tokenizer pattern is GPT-2's.
 *
 * Counter(classes, byte_ids, merges, cache_limit) takes, from Python:
 *   classes   bytes of 0x110000 flags, one per code point: 1 letter, 2 number, 4 whitespace, as the
 *             Oniguruma engine inside tokenizers classes \p{L}, \p{N} and \s (read off it by bpe_fast);
 *   byte_ids  256 int32 (native order): the vocabulary id of each byte's byte-level character, -1 if none;
 *   merges    int32 triples (left id, right id, merged id), in rank order (a later duplicate pair wins,
 *             as in tokenizers' merge map);
 *   cache_limit  distinct pieces kept before the piece cache is emptied.
 * count(segment) / encode(segment) then give the token count / ids of one plain segment: normalized, free
 * of added tokens, with ByteLevel's prefix space already applied. Pre-tokenization is GPT-2's pattern
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * written out as the first alternative that matches at each position (Oniguruma's order); each piece is
 * BPE-merged the way tokenizers' Word::merge_all does it: a min-heap of (rank, position), a popped merge
 * skipped when its left symbol is gone, has no right neighbour, or the pair there no longer merges to the
 * same id. Results never depend on the cache (it only saves work): a piece's ids are kept in one table, and the
 * last short pieces used also in a small direct-mapped copy read first (one cache line, not two scattered
 * reads). count_text(text, raw, normalized, unstable) counts a whole text in one call where bpe_fast's steps
 * before the pattern leave it unchanged (see there). The GIL is held throughout.
 *
 * Two scans serve the Python steps before it, for every file: CodePointSet (the first code point of a text
 * in a set: bpe_fast's test that a text is already normalized) and Trie (the leftmost-longest matches of
 * strings in a text: the added tokens).
 */
#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000 /* the stable ABI of CPython 3.11: one wheel for every later version */
#endif
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CL_L 1
#define CL_N 2
#define CL_S 4
#define N_CODE_POINTS 0x110000
#define LONG_PIECE 256 /* longer pieces are merged every time, never cached */

typedef struct {
    uint64_t key; /* left id << 32 | right id */
    int32_t rank; /* -1: empty slot */
    int32_t new_id;
} MergeSlot;

typedef struct {
    uint64_t hash; /* 0: empty slot */
    uint32_t key_off, key_len, ids_off, ids_len;
} Entry;

/* A slot of the hot cache: a direct-mapped copy of recently used short pieces (one cache line each), looked up
 * before the main table, whose entry and key would cost two scattered reads. */
#define HOT_KEY 12 /* code points kept inline; longer pieces go to the main table only */
#define HOT_SLOTS 4096
typedef struct {
    uint64_t hash; /* 0: empty */
    uint32_t ids_off;
    uint16_t key_len, ids_len;
    uint32_t key[HOT_KEY];
} HotSlot;

typedef struct { int32_t c, prev, next, len; } Symbol;
typedef struct { int32_t rank, pos, new_id; } HeapItem;

typedef struct {
    PyObject_HEAD
    PyObject *classes_obj;
    const uint8_t *classes;
    int32_t byte_ids[256];
    MergeSlot *merges;
    size_t merge_mask;
    /* piece cache: open addressing over code point keys, ids in an arena */
    Entry *table;
    size_t table_mask, used, limit;
    uint32_t *keys; size_t keys_len, keys_cap;
    int32_t *ids; size_t ids_len, ids_cap;
    HotSlot *hot; /* HOT_SLOTS, emptied with the main table */
    /* scratch */
    uint32_t *cp; size_t cp_cap;
    uint8_t *bytes; size_t bytes_cap;
    Symbol *syms; size_t syms_cap;
    HeapItem *heap; size_t heap_cap;
    int32_t *out; size_t out_len, out_cap;
} Counter;

static int grow(void **buf, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *p = PyMem_Realloc(*buf, n * item);
    if (!p) { PyErr_NoMemory(); return -1; }
    *buf = p;
    *cap = n;
    return 0;
}

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static const MergeSlot *merge_find(const Counter *self, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = mix64(key) & self->merge_mask;
    for (;;) {
        const MergeSlot *s = &self->merges[i];
        if (s->rank < 0) return NULL;
        if (s->key == key) return s;
        i = (i + 1) & self->merge_mask;
    }
}

/* ---------------------------------------------------------------- BPE of one piece */

static int heap_less(const HeapItem *x, const HeapItem *y) {
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static int heap_push(Counter *self, size_t *n, int32_t rank, int32_t pos, int32_t new_id) {
    if (grow((void **)&self->heap, &self->heap_cap, *n + 1, sizeof(HeapItem)) < 0) return -1;
    HeapItem *h = self->heap;
    size_t i = (*n)++;
    HeapItem item = {rank, pos, new_id};
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_less(&item, &h[parent])) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = item;
    return 0;
}

static HeapItem heap_pop(Counter *self, size_t *n) {
    HeapItem *h = self->heap;
    HeapItem top = h[0];
    HeapItem last = h[--(*n)];
    size_t i = 0, m = *n;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, best = i;
        const HeapItem *b = &last;
        if (l < m && heap_less(&h[l], b)) { best = l; b = &h[l]; }
        if (r < m && heap_less(&h[r], b)) { best = r; b = &h[r]; }
        if (best == i) break;
        h[i] = h[best];
        i = best;
    }
    if (m > 0) h[i] = last;
    return top;
}

/* Ids of the piece cp[0..n) appended to self->out. */
static int bpe(Counter *self, const uint32_t *cp, size_t n) {
    if (grow((void **)&self->bytes, &self->bytes_cap, 4 * n, 1) < 0) return -1;
    uint8_t *b = self->bytes;
    size_t nb = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = cp[i];
        if (c < 0x80) b[nb++] = (uint8_t)c;
        else if (c < 0x800) { b[nb++] = 0xC0 | (c >> 6); b[nb++] = 0x80 | (c & 0x3F); }
        else if (c < 0x10000) {
            if (c >= 0xD800 && c < 0xE000) { PyErr_SetString(PyExc_ValueError, "lone surrogate in text"); return -1; }
            b[nb++] = 0xE0 | (c >> 12); b[nb++] = 0x80 | ((c >> 6) & 0x3F); b[nb++] = 0x80 | (c & 0x3F);
        } else {
            b[nb++] = 0xF0 | (c >> 18); b[nb++] = 0x80 | ((c >> 12) & 0x3F);
            b[nb++] = 0x80 | ((c >> 6) & 0x3F); b[nb++] = 0x80 | (c & 0x3F);
        }
    }
    if (grow((void **)&self->syms, &self->syms_cap, nb, sizeof(Symbol)) < 0) return -1;
    Symbol *s = self->syms;
    for (size_t i = 0; i < nb; i++) {
        int32_t id = self->byte_ids[b[i]];
        if (id < 0) {
            PyErr_Format(PyExc_ValueError, "byte 0x%02x has no token in the vocabulary", b[i]);
            return -1;
        }
        s[i].c = id;
        s[i].prev = (int32_t)i - 1;
        s[i].next = i + 1 < nb ? (int32_t)i + 1 : -1;
        s[i].len = 1;
    }
    size_t heap_n = 0;
    for (size_t i = 0; i + 1 < nb; i++) {
        const MergeSlot *m = merge_find(self, s[i].c, s[i + 1].c);
        if (m && heap_push(self, &heap_n, m->rank, (int32_t)i, m->new_id) < 0) return -1;
    }
    while (heap_n > 0) {
        HeapItem top = heap_pop(self, &heap_n);
        Symbol *left = &s[top.pos];
        if (left->len == 0 || left->next < 0) continue;
        int32_t right_pos = left->next;
        Symbol right = s[right_pos];
        const MergeSlot *m = merge_find(self, left->c, right.c);
        if (!m || m->new_id != top.new_id) continue;
        left->c = top.new_id;
        left->len += right.len;
        left->next = right.next;
        s[right_pos].len = 0;
        if (right.next >= 0) s[right.next].prev = top.pos;
        if (left->prev >= 0) {
            const MergeSlot *pm = merge_find(self, s[left->prev].c, left->c);
            if (pm && heap_push(self, &heap_n, pm->rank, left->prev, pm->new_id) < 0) return -1;
        }
        if (left->next >= 0) {
            const MergeSlot *nm = merge_find(self, left->c, s[left->next].c);
            if (nm && heap_push(self, &heap_n, nm->rank, top.pos, nm->new_id) < 0) return -1;
        }
    }
    size_t count = 0;
    for (int32_t i = nb ? 0 : -1; i >= 0; i = s[i].next) count++;
    if (grow((void **)&self->out, &self->out_cap, self->out_len + count, sizeof(int32_t)) < 0) return -1;
    for (int32_t i = nb ? 0 : -1; i >= 0; i = s[i].next) self->out[self->out_len++] = s[i].c;
    return 0;
}

/* ---------------------------------------------------------------- the piece cache */

static void cache_clear(Counter *self) {
    memset(self->table, 0, (self->table_mask + 1) * sizeof(Entry));
    memset(self->hot, 0, HOT_SLOTS * sizeof(HotSlot));
    self->used = 0;
    self->keys_len = 0;
    self->ids_len = 0;
}

static int cache_resize(Counter *self, size_t slots) {
    Entry *t = PyMem_Calloc(slots, sizeof(Entry));
    if (!t) { PyErr_NoMemory(); return -1; }
    size_t mask = slots - 1;
    for (size_t i = 0; i <= self->table_mask; i++) {
        Entry *e = &self->table[i];
        if (!e->hash) continue;
        size_t j = e->hash & mask;
        while (t[j].hash) j = (j + 1) & mask;
        t[j] = *e;
    }
    PyMem_Free(self->table);
    self->table = t;
    self->table_mask = mask;
    return 0;
}

static inline int same_key(const uint32_t *a, const uint32_t *b, size_t n) {
    uint32_t diff = 0;
    for (size_t i = 0; i < n; i++) diff |= a[i] ^ b[i];
    return diff == 0;
}

static inline void hot_put(HotSlot *hot, const Entry *e, const uint32_t *cp) {
    hot->hash = e->hash;
    hot->ids_off = e->ids_off;
    hot->key_len = (uint16_t)e->key_len;
    hot->ids_len = (uint16_t)e->ids_len;
    memcpy(hot->key, cp, e->key_len * sizeof(uint32_t));
}

/* Appends the ids of cp[0..n) to self->out (a cached piece's only with keep_ids); *count gets how many. */
static int piece(Counter *self, const uint32_t *cp, size_t n, size_t *count, int keep_ids) {
    if (n > LONG_PIECE) {
        size_t before = self->out_len;
        if (bpe(self, cp, n) < 0) return -1;
        *count = self->out_len - before;
        return 0;
    }
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ n;
    size_t i = 0;
    for (; i + 1 < n; i += 2) h = (h ^ (cp[i] | (uint64_t)cp[i + 1] << 32)) * 0x100000001B3ULL;
    if (i < n) h = (h ^ cp[i]) * 0x100000001B3ULL;
    h = mix64(h) | 1;
    HotSlot *hot = n <= HOT_KEY ? &self->hot[(h >> 40) & (HOT_SLOTS - 1)] : NULL;
    if (hot && hot->hash == h && hot->key_len == n && same_key(hot->key, cp, n)) {
        *count = hot->ids_len;
        if (!keep_ids) return 0;
        if (grow((void **)&self->out, &self->out_cap, self->out_len + hot->ids_len, sizeof(int32_t)) < 0) return -1;
        memcpy(self->out + self->out_len, self->ids + hot->ids_off, hot->ids_len * sizeof(int32_t));
        self->out_len += hot->ids_len;
        return 0;
    }
    size_t j = h & self->table_mask;
    for (;;) {
        Entry *e = &self->table[j];
        if (!e->hash) break;
        if (e->hash == h && e->key_len == n && memcmp(self->keys + e->key_off, cp, n * sizeof(uint32_t)) == 0) {
            *count = e->ids_len;
            if (hot) hot_put(hot, e, cp);
            if (!keep_ids) return 0;
            if (grow((void **)&self->out, &self->out_cap, self->out_len + e->ids_len, sizeof(int32_t)) < 0) return -1;
            memcpy(self->out + self->out_len, self->ids + e->ids_off, e->ids_len * sizeof(int32_t));
            self->out_len += e->ids_len;
            return 0;
        }
        j = (j + 1) & self->table_mask;
    }
    size_t before = self->out_len;
    if (bpe(self, cp, n) < 0) return -1;
    size_t k = self->out_len - before;
    *count = k;
    if (self->used + 1 > self->limit) {
        cache_clear(self);
    } else if (2 * (self->used + 1) > self->table_mask + 1) {
        if (cache_resize(self, 2 * (self->table_mask + 1)) < 0) return -1;
    }
    if (grow((void **)&self->keys, &self->keys_cap, self->keys_len + n, sizeof(uint32_t)) < 0) return -1;
    if (grow((void **)&self->ids, &self->ids_cap, self->ids_len + k, sizeof(int32_t)) < 0) return -1;
    j = h & self->table_mask;
    while (self->table[j].hash) j = (j + 1) & self->table_mask;
    Entry *e = &self->table[j];
    e->hash = h;
    e->key_off = (uint32_t)self->keys_len;
    e->key_len = (uint32_t)n;
    e->ids_off = (uint32_t)self->ids_len;
    e->ids_len = (uint32_t)k;
    memcpy(self->keys + self->keys_len, cp, n * sizeof(uint32_t));
    self->keys_len += n;
    memcpy(self->ids + self->ids_len, self->out + before, k * sizeof(int32_t));
    self->ids_len += k;
    self->used++;
    if (hot) hot_put(hot, e, cp);
    return 0;
}

/* ---------------------------------------------------------------- GPT-2's pattern */

/* The code points of a str, copied into *buf (grown as needed); -1 with an exception set. */
static Py_ssize_t code_points(PyObject *text, uint32_t **buf, size_t *cap) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "a str is needed");
        return -1;
    }
    Py_ssize_t n = PyUnicode_GetLength(text);
    if (n < 0) return -1;
    if (grow((void **)buf, cap, (size_t)n + 1, sizeof(uint32_t)) < 0) return -1;
    if (n > 0 && !PyUnicode_AsUCS4(text, (Py_UCS4 *)*buf, n, 0)) return -1;
    return n;
}


/* Runs every piece of the segment cp[0..n); returns the number of tokens, or -1 with an exception set. */
static Py_ssize_t run_code_points(Counter *self, const uint32_t *cp, Py_ssize_t n, int keep_ids) {
    const uint8_t *cls = self->classes;
#define CLS(c) (cls[(c)])
#define OTHER(c) (!(CLS(c) & (CL_L | CL_N | CL_S)))
    Py_ssize_t total = 0, i = 0;
    self->out_len = 0;
    while (i < n) {
        uint32_t c = cp[i];
        Py_ssize_t end = -1;
        if (c == '\'' && i + 1 < n) {
            uint32_t c1 = cp[i + 1];
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') end = i + 2;
            else if (i + 2 < n) {
                uint32_t c2 = cp[i + 2];
                if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) end = i + 3;
            }
        }
        if (end < 0) {
            int space = c == ' ' && i + 1 < n;
            static const uint8_t runs[2] = {CL_L, CL_N};
            for (int r = 0; r < 2 && end < 0; r++) {
                Py_ssize_t j = (space && (CLS(cp[i + 1]) & runs[r])) ? i + 1 : i;
                if (CLS(cp[j]) & runs[r]) {
                    end = j + 1;
                    while (end < n && (CLS(cp[end]) & runs[r])) end++;
                }
            }
            if (end < 0) {
                Py_ssize_t j = (space && OTHER(cp[i + 1])) ? i + 1 : i;
                if (OTHER(cp[j])) {
                    end = j + 1;
                    while (end < n && OTHER(cp[end])) end++;
                }
            }
        }
        if (end < 0) { /* c is whitespace: \s+(?!\S) leaves the run's last character to what follows it */
            end = i + 1;
            while (end < n && (CLS(cp[end]) & CL_S)) end++;
            if (end < n && end - i >= 2) end--;
        }
        size_t k;
        if (piece(self, cp + i, (size_t)(end - i), &k, keep_ids) < 0) return -1;
        total += (Py_ssize_t)k;
        if (!keep_ids) self->out_len = 0;
        i = end;
    }
#undef CLS
#undef OTHER
    return total;
}

static Py_ssize_t run(Counter *self, PyObject *text, int keep_ids) {
    Py_ssize_t n = code_points(text, &self->cp, &self->cp_cap);
    if (n < 0) return -1;
    return run_code_points(self, self->cp, n, keep_ids);
}

static PyObject *Counter_count(Counter *self, PyObject *text) {
    Py_ssize_t total = run(self, text, 0);
    self->out_len = 0;
    return total < 0 ? NULL : PyLong_FromSsize_t(total);
}

static PyObject *Counter_encode(Counter *self, PyObject *text) {
    if (run(self, text, 1) < 0) return NULL;
    PyObject *list = PyList_New((Py_ssize_t)self->out_len);
    if (!list) return NULL;
    for (size_t i = 0; i < self->out_len; i++) {
        PyObject *v = PyLong_FromLong(self->out[i]);
        if (!v) { Py_DECREF(list); return NULL; }
        PyList_SetItem(list, (Py_ssize_t)i, v); /* steals v */
    }
    self->out_len = 0;
    return list;
}

static PyObject *Counter_cached(Counter *self, PyObject *Py_UNUSED(unused)) {
    return PyLong_FromSize_t(self->used);
}

/* ---------------------------------------------------------------- the type */

static int Counter_init(Counter *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"classes", "byte_ids", "merges", "cache_limit", NULL};
    PyObject *classes;
    Py_buffer byte_ids, merges;
    Py_ssize_t limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Sy*y*n", names, &classes, &byte_ids, &merges, &limit)) return -1;
    int rc = -1;
    if (PyBytes_Size(classes) != N_CODE_POINTS) {
        PyErr_SetString(PyExc_ValueError, "classes must hold one byte per code point (0x110000)");
        goto done;
    }
    if (byte_ids.len != 256 * (Py_ssize_t)sizeof(int32_t) || merges.len % (3 * (Py_ssize_t)sizeof(int32_t)) || limit < 1) {
        PyErr_SetString(PyExc_ValueError, "byte_ids must be 256 int32, merges int32 triples, cache_limit >= 1");
        goto done;
    }
    Py_INCREF(classes);
    Py_XDECREF(self->classes_obj);
    self->classes_obj = classes;
    self->classes = (const uint8_t *)PyBytes_AsString(classes);
    memcpy(self->byte_ids, byte_ids.buf, sizeof(self->byte_ids));
    size_t n_merges = merges.len / (3 * sizeof(int32_t));
    size_t slots = 16;
    while (slots < 2 * n_merges + 2) slots *= 2;
    PyMem_Free(self->merges);
    self->merges = PyMem_Malloc(slots * sizeof(MergeSlot));
    if (!self->merges) { PyErr_NoMemory(); goto done; }
    for (size_t i = 0; i < slots; i++) self->merges[i].rank = -1;
    self->merge_mask = slots - 1;
    const int32_t *m = merges.buf;
    for (size_t r = 0; r < n_merges; r++) {
        uint64_t key = ((uint64_t)(uint32_t)m[3 * r] << 32) | (uint32_t)m[3 * r + 1];
        size_t i = mix64(key) & self->merge_mask;
        while (self->merges[i].rank >= 0 && self->merges[i].key != key) i = (i + 1) & self->merge_mask;
        self->merges[i].key = key; /* a later duplicate overwrites: the last rank wins */
        self->merges[i].rank = (int32_t)r;
        self->merges[i].new_id = m[3 * r + 2];
    }
    self->limit = (size_t)limit;
    PyMem_Free(self->table);
    self->table = PyMem_Calloc(1 << 12, sizeof(Entry));
    self->table_mask = (1 << 12) - 1;
    self->used = self->keys_len = self->ids_len = 0;
    PyMem_Free(self->hot);
    self->hot = PyMem_Calloc(HOT_SLOTS, sizeof(HotSlot));
    if (!self->table || !self->hot) { PyErr_NoMemory(); goto done; }
    rc = 0;
done:
    PyBuffer_Release(&byte_ids);
    PyBuffer_Release(&merges);
    return rc;
}

static void Counter_dealloc(Counter *self) {
    Py_XDECREF(self->classes_obj);
    PyMem_Free(self->merges);
    PyMem_Free(self->table);
    PyMem_Free(self->hot);
    PyMem_Free(self->keys);
    PyMem_Free(self->ids);
    PyMem_Free(self->cp);
    PyMem_Free(self->bytes);
    PyMem_Free(self->syms);
    PyMem_Free(self->heap);
    PyMem_Free(self->out);
    PyTypeObject *type = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type); /* a heap type: its instances hold a reference */
}

static PyObject *Counter_count_text(Counter *self, PyObject *args); /* below the Trie it uses */

static PyMethodDef Counter_methods[] = {
    {"count", (PyCFunction)Counter_count, METH_O, "Token count of one plain segment."},
    {"count_text", (PyCFunction)Counter_count_text, METH_VARARGS,
     "count_text(text, raw, normalized, unstable): token count of a whole text, or -1 where the caller's general path must count it."},
    {"encode", (PyCFunction)Counter_encode, METH_O, "Token ids of one plain segment."},
    {"cached", (PyCFunction)Counter_cached, METH_NOARGS, "Pieces in the cache now."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Counter_slots[] = {
    {Py_tp_doc, "GPT-2-pattern pre-tokenization and byte-level BPE of plain segments (see the module source)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Counter_init},
    {Py_tp_dealloc, Counter_dealloc},
    {Py_tp_methods, Counter_methods},
    {0, NULL},
};

static PyType_Spec Counter_spec = {
    "quadmix_udfs._bpe_native.Counter", sizeof(Counter), 0, Py_TPFLAGS_DEFAULT, Counter_slots,
};

/* ---------------------------------------------------------------- scans for bpe_fast's Python steps */

/* CodePointSet(flags): flags is bytes of 0x110000, nonzero for the members.
 * search(text) -> the index of the first member in text, or -1. */
typedef struct {
    PyObject_HEAD
    PyObject *flags_obj;
    const uint8_t *flags;
    uint32_t *cp; size_t cp_cap;
} CodePointSet;

static int CodePointSet_init(CodePointSet *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"flags", NULL};
    PyObject *flags;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "S", names, &flags)) return -1;
    if (PyBytes_Size(flags) != N_CODE_POINTS) {
        PyErr_SetString(PyExc_ValueError, "flags must hold one byte per code point (0x110000)");
        return -1;
    }
    Py_INCREF(flags);
    Py_XDECREF(self->flags_obj);
    self->flags_obj = flags;
    self->flags = (const uint8_t *)PyBytes_AsString(flags);
    return 0;
}

static PyObject *CodePointSet_search(CodePointSet *self, PyObject *text) {
    if (!self->flags) {
        PyErr_SetString(PyExc_ValueError, "CodePointSet not initialised");
        return NULL;
    }
    Py_ssize_t n = code_points(text, &self->cp, &self->cp_cap);
    if (n < 0) return NULL;
    const uint32_t *cp = self->cp;
    for (Py_ssize_t i = 0; i < n; i++)
        if (self->flags[cp[i]]) return PyLong_FromSsize_t(i);
    return PyLong_FromLong(-1);
}

static void CodePointSet_dealloc(CodePointSet *self) {
    Py_XDECREF(self->flags_obj);
    PyMem_Free(self->cp);
    PyTypeObject *type = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

static PyMethodDef CodePointSet_methods[] = {
    {"search", (PyCFunction)CodePointSet_search, METH_O, "Index of the first member code point of a str, or -1."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot CodePointSet_slots[] = {
    {Py_tp_doc, "A set of code points, one flag byte each; search(text) finds the first member."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, CodePointSet_init},
    {Py_tp_dealloc, CodePointSet_dealloc},
    {Py_tp_methods, CodePointSet_methods},
    {0, NULL},
};

static PyType_Spec CodePointSet_spec = {
    "quadmix_udfs._bpe_native.CodePointSet", sizeof(CodePointSet), 0, Py_TPFLAGS_DEFAULT, CodePointSet_slots,
};

/* Trie(starts, chars, targets, terminals): a character trie of strings in CSR form. Node 0 is the root;
 * node k's edges are starts[k]..starts[k+1] (int32, n_nodes + 1 of them), each a code point (chars, uint32,
 * sorted within a node) and the node it leads to (targets, int32); terminals (int32 per node) is the index
 * of the string ending at the node, or -1.
 * find(text) -> [(start, stop, index), ...]: the matches a scan from the left finds, each the longest
 * string starting at the leftmost position where one starts, the scan going on after its end (what
 * re.finditer gives for the trie written as a pattern with greedy optional groups). */
typedef struct {
    PyObject_HEAD
    int32_t *starts, *targets, *terminals;
    uint32_t *chars;
    Py_ssize_t n_nodes;
    uint8_t pairs[256 * 256 / 8]; /* bit (a & 255) << 8 | (b & 255): some string may start with a, b */
    uint32_t *cp; size_t cp_cap;
} Trie;

static int Trie_init(Trie *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"starts", "chars", "targets", "terminals", NULL};
    Py_buffer st, ch, tg, tm;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*y*y*", names, &st, &ch, &tg, &tm)) return -1;
    int rc = -1;
    Py_ssize_t nodes = tm.len / (Py_ssize_t)sizeof(int32_t);
    Py_ssize_t edges = ch.len / (Py_ssize_t)sizeof(uint32_t);
    if (nodes < 1 || tm.len % sizeof(int32_t) || st.len != (nodes + 1) * (Py_ssize_t)sizeof(int32_t)
        || ch.len % sizeof(uint32_t) || tg.len != edges * (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_ValueError, "Trie: starts must be int32[nodes + 1], chars uint32[edges], targets int32[edges], terminals int32[nodes]");
        goto done;
    }
    const int32_t *s = st.buf, *t = tg.buf;
    const uint32_t *c = ch.buf;
    if (s[0] != 0 || s[nodes] != edges) {
        PyErr_SetString(PyExc_ValueError, "Trie: starts must run from 0 to the number of edges");
        goto done;
    }
    for (Py_ssize_t k = 0; k < nodes; k++) {
        if (s[k + 1] < s[k] || s[k + 1] > edges) {
            PyErr_SetString(PyExc_ValueError, "Trie: starts must not decrease nor pass the number of edges");
            goto done;
        }
        for (int32_t e = s[k]; e < s[k + 1]; e++) {
            if (t[e] <= 0 || t[e] >= nodes || c[e] >= N_CODE_POINTS || (e > s[k] && c[e] <= c[e - 1])) {
                PyErr_SetString(PyExc_ValueError, "Trie: an edge leads out of the trie, or a node's characters are not strictly increasing");
                goto done;
            }
        }
    }
    /* all or nothing: a failed (re-)initialisation leaves the trie as it was */
    int32_t *starts = PyMem_Malloc(st.len), *targets = PyMem_Malloc(tg.len ? tg.len : 1);
    int32_t *terminals = PyMem_Malloc(tm.len);
    uint32_t *chars = PyMem_Malloc(ch.len ? ch.len : 1);
    if (!starts || !targets || !terminals || !chars) {
        PyMem_Free(starts); PyMem_Free(targets); PyMem_Free(terminals); PyMem_Free(chars);
        PyErr_NoMemory();
        goto done;
    }
    memcpy(starts, st.buf, st.len); memcpy(targets, tg.buf, tg.len);
    memcpy(terminals, tm.buf, tm.len); memcpy(chars, ch.buf, ch.len);
    PyMem_Free(self->starts); PyMem_Free(self->targets); PyMem_Free(self->terminals); PyMem_Free(self->chars);
    self->starts = starts; self->targets = targets; self->terminals = terminals; self->chars = chars;
    self->n_nodes = nodes;
    memset(self->pairs, 0, sizeof(self->pairs));
    for (int32_t e = s[0]; e < s[1]; e++) {
        uint32_t a = (c[e] & 255) << 8;
        int32_t child = t[e];
        if (((const int32_t *)tm.buf)[child] >= 0) { /* a one-character string: any next character */
            memset(self->pairs + (a >> 3), 0xff, 256 / 8);
            continue;
        }
        for (int32_t f = s[child]; f < s[child + 1]; f++) {
            uint32_t k = a | (c[f] & 255);
            self->pairs[k >> 3] |= (uint8_t)(1u << (k & 7));
        }
    }
    rc = 0;
done:
    PyBuffer_Release(&st); PyBuffer_Release(&ch); PyBuffer_Release(&tg); PyBuffer_Release(&tm);
    return rc;
}

static inline int32_t trie_child(const Trie *self, int32_t node, uint32_t c) {
    int32_t lo = self->starts[node], hi = self->starts[node + 1];
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        uint32_t m = self->chars[mid];
        if (m == c) return self->targets[mid];
        if (m < c) lo = mid + 1; else hi = mid;
    }
    return -1;
}

/* The leftmost-longest match starting at or after i in cp[0..n) (cp[n] readable: the pair filter reads one
 * past the end): its start, with *stop and *term set; -1 when there is none. */
static Py_ssize_t trie_next(const Trie *self, const uint32_t *cp, Py_ssize_t n, Py_ssize_t i, Py_ssize_t *stop, int32_t *term) {
    const uint8_t *pairs = self->pairs;
    while (i < n) {
        /* one well-predicted branch per character where no string starts: most of a text */
        uint32_t k = (cp[i] & 255) << 8 | (cp[i + 1] & 255);
        if (!((pairs[k >> 3] >> (k & 7)) & 1)) { i++; continue; }
        int32_t node = 0;
        *stop = -1;
        for (Py_ssize_t j = i; j < n; j++) {
            node = trie_child(self, node, cp[j]);
            if (node < 0) break;
            if (self->terminals[node] >= 0) { *stop = j + 1; *term = self->terminals[node]; }
        }
        if (*stop >= 0) return i;
        i++;
    }
    return -1;
}

static PyObject *Trie_find(Trie *self, PyObject *text) {
    if (!self->starts) {
        PyErr_SetString(PyExc_ValueError, "Trie not initialised");
        return NULL;
    }
    Py_ssize_t n = code_points(text, &self->cp, &self->cp_cap);
    if (n < 0) return NULL;
    self->cp[n] = 0;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    Py_ssize_t i = 0, stop;
    int32_t term;
    while ((i = trie_next(self, self->cp, n, i, &stop, &term)) >= 0) {
        PyObject *m = Py_BuildValue("(nni)", i, stop, (int)term);
        if (!m || PyList_Append(out, m) < 0) { Py_XDECREF(m); Py_DECREF(out); return NULL; }
        Py_DECREF(m);
        i = stop;
    }
    return out;
}

static void Trie_dealloc(Trie *self) {
    PyMem_Free(self->starts); PyMem_Free(self->targets); PyMem_Free(self->terminals); PyMem_Free(self->chars);
    PyMem_Free(self->cp);
    PyTypeObject *type = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

static PyMethodDef Trie_methods[] = {
    {"find", (PyCFunction)Trie_find, METH_O, "Leftmost-longest matches of a str: [(start, stop, index), ...]."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Trie_slots[] = {
    {Py_tp_doc, "A character trie of strings; find(text) gives their leftmost-longest matches."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Trie_init},
    {Py_tp_dealloc, Trie_dealloc},
    {Py_tp_methods, Trie_methods},
    {0, NULL},
};

static PyType_Spec Trie_spec = {
    "quadmix_udfs._bpe_native.Trie", sizeof(Trie), 0, Py_TPFLAGS_DEFAULT, Trie_slots,
};

/* ---------------------------------------------------------------- a whole text in one call */

static PyObject *TrieType, *CodePointSetType; /* set when the module is created */

/* count_text(text, raw, normalized, unstable) -> bpe_fast's count of a whole text where these settle it,
 * else -1 (the caller's general path then counts it, and raises what it raises):
 *   raw         Trie of the added tokens matched on the raw text, or None: a text holding one is left to the caller;
 *   normalized  Trie of the normalized added tokens (leftmost-longest, no single_word/lstrip/rstrip rule), or None;
 *   unstable    CodePointSet of the characters that the normalizer may change (None: it changes none); a text
 *               holding one is left to the caller, as is one holding a surrogate.
 * Otherwise the text is its own normal form, so each normalized added token counts 1 and each stretch between
 * them is a plain segment counted as count() does (no ByteLevel prefix space: the caller does not call this
 * when the file adds one). */
static PyObject *Counter_count_text(Counter *self, PyObject *args) {
    PyObject *text, *raw, *norm, *unstable;
    if (!PyArg_ParseTuple(args, "UOOO", &text, &raw, &norm, &unstable)) return NULL;
    const Trie *raw_trie = NULL, *norm_trie = NULL;
    const uint8_t *flags = NULL;
    int ok;
    if (raw != Py_None) {
        if ((ok = PyObject_IsInstance(raw, TrieType)) <= 0) goto bad;
        raw_trie = (const Trie *)raw;
    }
    if (norm != Py_None) {
        if ((ok = PyObject_IsInstance(norm, TrieType)) <= 0) goto bad;
        norm_trie = (const Trie *)norm;
    }
    if (unstable != Py_None) {
        if ((ok = PyObject_IsInstance(unstable, CodePointSetType)) <= 0) goto bad;
        flags = ((const CodePointSet *)unstable)->flags;
    }
    if ((raw_trie && !raw_trie->starts) || (norm_trie && !norm_trie->starts) || (unstable != Py_None && !flags)) {
        PyErr_SetString(PyExc_ValueError, "count_text: a Trie or CodePointSet is not initialised");
        return NULL;
    }
    Py_ssize_t n = code_points(text, &self->cp, &self->cp_cap);
    if (n < 0) return NULL;
    self->cp[n] = 0;
    const uint32_t *cp = self->cp;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c = cp[i];
        if (c - 0xD800u < 0x800u || (flags && flags[c])) return PyLong_FromLong(-1);
    }
    Py_ssize_t stop, start;
    int32_t term;
    if (raw_trie && trie_next(raw_trie, cp, n, 0, &stop, &term) >= 0) return PyLong_FromLong(-1);
    Py_ssize_t total = 0, offset = 0;
    while (offset < n) {
        start = norm_trie ? trie_next(norm_trie, cp, n, offset, &stop, &term) : -1;
        Py_ssize_t end = start < 0 ? n : start;
        if (end > offset) {
            Py_ssize_t k = run_code_points(self, cp + offset, end - offset, 0);
            if (k < 0) return NULL;
            total += k;
        }
        if (start < 0) break;
        total += 1;
        offset = stop;
    }
    self->out_len = 0;
    return PyLong_FromSsize_t(total);
bad:
    if (ok == 0) PyErr_SetString(PyExc_TypeError, "count_text(text, raw, normalized, unstable): Trie, Trie, CodePointSet or None");
    return NULL;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bpe_native", "Native inner loop of quadmix_udfs.bpe_fast.", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bpe_native(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyType_Spec *specs[] = {&Counter_spec, &CodePointSet_spec, &Trie_spec};
    const char *names[] = {"Counter", "CodePointSet", "Trie"};
    for (int i = 0; i < 3; i++) {
        PyObject *type = PyType_FromSpec(specs[i]);
        if (!type || PyModule_AddObject(m, names[i], type) < 0) {
            Py_XDECREF(type);
            Py_DECREF(m);
            return NULL;
        }
        if (i == 1) CodePointSetType = type; /* the module holds the reference */
        if (i == 2) TrieType = type;
    }
    return m;
}
