/* Compiled kernel of quadmix_udfs.text_stats: the STATS of every document of a UTF-8 string array, with the
 * same float64 values, bit for bit, as the module's numpy path (whose docstring defines them).
 *
 * Kernel(flags, stop_words, lorem, javascript, policy) takes, from Python:
 *   flags       bytes of 0x110000, one per code point: 1 str.isalpha, 2 str.isspace, 4 in BULLETS, 8 in TERMINAL
 *               (checked: the ASCII letters are A-Z and a-z, and no ASCII whitespace is above the space);
 *   stop_words  STOP_WORDS as bytes: distinct, lower-case ASCII letters, 1 to 8 each, at most 64 words;
 *   lorem, javascript, policy  the phrases (bytes: printable lower-case ASCII starting with a letter, 4 to 64
 *               bytes) that set lorem_ipsum (anywhere in a text), javascript_lines and policy_lines (in a line).
 * stats(data, offsets, out): document i is data[offsets[i]:offsets[i + 1]] (offsets: n + 1 int64, aligned,
 * non-decreasing, inside data); out, a writable aligned float64 buffer of 25 x n, gets statistic STATS[k] of
 * document i at k * n + i (the module's STATS tuple names the rows). The GIL is released while it runs, and
 * the scratch memory belongs to the call.
 *
 * What makes the values the numpy path's, whatever the batch:
 *   - every statistic is a ratio of integer counts of one document, divided in float64 as numpy divides
 *     (x / max(denominator, 1));
 *   - "same word", "same line" and "same n-gram" are decided exactly as numpy decides them: the same 64-bit
 *     hashes (the word hash of the bytes, the polynomial line hash of the word hashes, the n-gram chain
 *     gram(i, n) = mix(gram(i, n - 1) * K3 + hash(i + n - 1)), all modulo 2**64), two of one document being
 *     the same when the top 42 bits of their hashes are, and an n-gram compared only at numpy's candidates:
 *     where the (n-1)-grams at i and i + 1 both repeat. So a 42-bit collision gives numpy's answer too. Groups
 *     come from hash tables instead of sorting; a group's first member is its smallest position, as in
 *     numpy's sort by (hash, position).
 * The texts are valid UTF-8 (Arrow strings). Otherwise each byte that does not start a well-formed sequence
 * inside its document counts as one character U+FFFD: deterministic and per document, but not numpy's values.
 */
#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000 /* the stable ABI of CPython 3.11: one wheel for every later version */
#endif
#include <Python.h>
#include <stdint.h>
#include <stdlib.h> /* malloc and friends: the scratch memory is used without the GIL */
#include <string.h>

#define N_CODE_POINTS 0x110000
#define F_ALPHA 1
#define F_SPACE 2
#define F_BULLET 4
#define F_TERMINAL 8
#define C_SLOW 16 /* Kernel.cls only: a byte >= 0x80 (a multi-byte character) or '#', '.', '{' */

#define K1 0xFF51AFD7ED558CCDULL
#define K2 0xC4CEB9FE1A85EC53ULL
#define K3 0x9E3779B97F4A7C15ULL
#define P_LINE (0x9E3779B97F4A7C15ULL | 1) /* the line hash's base */
#define POS_BITS 22                         /* numpy packs a position below the hash: equality is on the top 42 */
#define MAX_STOP 64
#define MAX_PHRASES 32
#define MIN_PHRASE 4
#define MAX_PHRASE 64
#define HEAD_BITS 16
#define MAX_DOC_BYTES ((size_t)INT32_MAX - 1) /* word positions are int32 */

#define PH_LOREM 1
#define PH_JAVASCRIPT 2
#define PH_POLICY 4

enum {
    ST_WORDS, ST_CHARS, ST_LINES, ST_MEAN_WORD_LENGTH, ST_SYMBOL_WORD_RATIO, ST_BULLET_LINES, ST_ELLIPSIS_LINES,
    ST_ALPHA_WORDS, ST_STOP_WORDS, ST_DUP_LINES, ST_DUP_LINE_CHARS, ST_TOP_2GRAM, ST_TOP_3GRAM, ST_TOP_4GRAM,
    ST_DUP_5GRAM, ST_DUP_6GRAM, ST_DUP_7GRAM, ST_DUP_8GRAM, ST_DUP_9GRAM, ST_DUP_10GRAM, ST_TERMINAL_LINES,
    ST_LOREM_IPSUM, ST_CURLY_BRACKET, ST_JAVASCRIPT_LINES, ST_POLICY_LINES, N_STATS
};
static const char *const STAT_NAMES[N_STATS] = {
    "words", "chars", "lines", "mean_word_length", "symbol_word_ratio", "bullet_lines", "ellipsis_lines",
    "alpha_words", "stop_words", "dup_lines", "dup_line_chars", "top_2gram", "top_3gram", "top_4gram",
    "dup_5gram", "dup_6gram", "dup_7gram", "dup_8gram", "dup_9gram", "dup_10gram", "terminal_lines",
    "lorem_ipsum", "curly_bracket", "javascript_lines", "policy_lines",
};
#define MIN_NGRAM 2
#define MAX_TOP_NGRAM 4 /* top_{2,3,4}gram, then dup_{5..10}gram: row ST_TOP_2GRAM + n - 2 */
#define MAX_NGRAM 10

typedef struct {
    uint8_t text[MAX_PHRASE];
    size_t len;
    unsigned kind;
} Phrase;

typedef struct {
    PyObject_HEAD
    PyObject *flags_obj;
    const uint8_t *flags;
    uint8_t cls[256]; /* per byte: the flags of an ASCII code point, and C_SLOW */
    uint8_t lower[256];
    /* stop words by a perfect hash of the ASCII-folded word: slot (folded * stop_mul) >> 56 */
    uint64_t stop_mul;
    uint64_t stop_slot[256]; /* the stop word there, packed little-endian (0: none) */
    uint64_t stop_bit[256];  /* and its bit */
    Phrase phrases[MAX_PHRASES];
    int n_phrases;
    uint8_t heads[1 << (HEAD_BITS - 3)]; /* bit head_slot(4 bytes): some phrase may start with them */
} Kernel;

/* ---------------------------------------------------------------- bytes and hashes */

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= K1;
    x ^= x >> 33; x *= K2;
    x ^= x >> 33;
    return x;
}

/* The n <= 8 bytes at p as a little-endian integer, zero above them. */
static inline uint64_t load_le(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    if (n == 8) {
        memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
#endif
        return v;
    }
    for (size_t k = 0; k < n; k++) v |= (uint64_t)p[k] << (8 * k);
    return v;
}

static inline uint64_t low_bytes(size_t n) { return n >= 8 ? ~0ULL : (1ULL << (8 * n)) - 1; }

/* load_le(p, min(n, 8)), with one 8-byte load where avail >= 8 bytes can be read at p. */
static inline uint64_t load_upto8(const uint8_t *p, size_t n, size_t avail) {
    if (avail >= 8) return load_le(p, 8) & low_bytes(n);
    return load_le(p, n < 8 ? n : 8);
}

/* numpy's _word_hashes: up to 8 bytes (and below 8 the length) packed and mixed; a longer word sums its
 * 8-byte pieces, each mixed with its index, and mixes the sum with the length. */
static inline uint64_t word_hash(const uint8_t *w, size_t nb, size_t avail, uint64_t first) {
    if (nb <= 8) return mix(nb < 8 ? first | (uint64_t)nb << 56 : first);
    uint64_t sum = 0;
    for (size_t j = 0; 8 * j < nb; j++)
        sum += mix(load_upto8(w + 8 * j, nb - 8 * j, avail - 8 * j) + (uint64_t)j * K3);
    return mix(sum + (uint64_t)nb * K1);
}

/* Byte-parallel tests on 8 bytes (SWAR). A "zero byte" test borrows across bytes, so it is exact for the
 * lowest flagged byte only, which is all the scan asks of it. */
static inline uint64_t zero_bytes(uint64_t x) { return (x - ONES) & ~x & HIGHS; }

/* The high bit of the bytes that end a run of plain ASCII word bytes: below 0x21 (whitespace and controls),
 * from 0x80 (multi-byte characters), '#', '.', '{'; exact for the lowest one. */
static inline uint64_t run_ends(uint64_t x) {
    return ((x - ONES * 0x21) & ~x & HIGHS) | (x & HIGHS) | zero_bytes(x ^ (ONES * '#'))
           | zero_bytes(x ^ (ONES * '.')) | zero_bytes(x ^ (ONES * '{'));
}

/* The high bit of the ASCII letters among bytes below 0x80 (exact: each byte is tested in 7 bits, no carry). */
static inline uint64_t letter_bytes(uint64_t x) {
    uint64_t y = (x | ONES * 0x20) & ~HIGHS; /* lower-cased */
    return (y + ONES * (0x80 - 'a')) & ~(y + ONES * (0x80 - 'z' - 1)) & HIGHS;
}

/* The index of the lowest byte of m whose high bit is set (m holds high bits only, and one at least). */
static inline size_t lowest_byte(uint64_t m) {
    return (size_t)((((m & (~m + 1)) >> 7) * 0x0001020304050607ULL) >> 56);
}

/* ---------------------------------------------------------------- UTF-8 */

/* The code point at d[0] (avail >= 1 bytes of the document from there) and its length: a well-formed UTF-8
 * sequence, or the one byte as U+FFFD. */
static inline uint32_t decode(const uint8_t *d, size_t avail, size_t *len) {
    uint32_t b0 = d[0], cp;
    *len = 1;
    if (b0 < 0x80) return b0;
    if (b0 < 0xC2 || b0 > 0xF4) return 0xFFFD;
    if (b0 < 0xE0) {
        if (avail < 2 || (d[1] & 0xC0) != 0x80) return 0xFFFD;
        *len = 2;
        return (b0 & 0x1F) << 6 | (d[1] & 0x3F);
    }
    if (b0 < 0xF0) {
        if (avail < 3 || (d[1] & 0xC0) != 0x80 || (d[2] & 0xC0) != 0x80) return 0xFFFD;
        cp = (b0 & 0x0F) << 12 | (uint32_t)(d[1] & 0x3F) << 6 | (d[2] & 0x3F);
        if (cp < 0x800 || (cp >= 0xD800 && cp < 0xE000)) return 0xFFFD;
        *len = 3;
        return cp;
    }
    if (avail < 4 || (d[1] & 0xC0) != 0x80 || (d[2] & 0xC0) != 0x80 || (d[3] & 0xC0) != 0x80) return 0xFFFD;
    cp = (b0 & 0x07) << 18 | (uint32_t)(d[1] & 0x3F) << 12 | (uint32_t)(d[2] & 0x3F) << 6 | (d[3] & 0x3F);
    if (cp < 0x10000 || cp > 0x10FFFF) return 0xFFFD;
    *len = 4;
    return cp;
}

/* ---------------------------------------------------------------- scratch memory of one call */

typedef struct {
    uint64_t key; /* top 42 bits of a hash */
    uint32_t gen; /* the table use that wrote the slot; older slots are empty */
    int32_t group;
} Slot;

typedef struct {
    size_t words_cap;       /* capacity of the per-word arrays */
    uint64_t *hash, *gram;  /* per word: its hash; the hash of the n-gram starting there */
    int64_t *cum;           /* characters of words 0..i-1 (words_cap + 1) */
    uint8_t *rep;           /* the current n-gram at a position repeats (words_cap + 1) */
    int32_t *pos, *grp;     /* the candidates of an n-gram size, and their groups */
    int32_t *count, *first; /* per group: members, smallest position */
    size_t lines_cap;
    uint64_t *line_hash;
    int64_t *line_chars;
    size_t *line_start; /* where the line's first word starts */
    Slot *slots;
    size_t slots_cap, mask, n_groups;
    uint32_t gen;
} Scratch;

static void *grow_array(void *p, size_t n, size_t item) {
    if (n > SIZE_MAX / item) return NULL;
    return realloc(p, n * item);
}

#define GROW(s, field, n) ((s)->field = grow_array((s)->field, (n), sizeof(*(s)->field))) != NULL

static int grow_words(Scratch *s, size_t need) {
    size_t n = s->words_cap ? s->words_cap : 1024;
    while (n < need) n *= 2;
    if (!(GROW(s, hash, n) && GROW(s, gram, n) && GROW(s, cum, n + 1) && GROW(s, rep, n + 1) && GROW(s, pos, n)
          && GROW(s, grp, n) && GROW(s, count, n) && GROW(s, first, n)))
        return -1;
    s->words_cap = n;
    return 0;
}

static int grow_lines(Scratch *s, size_t need) {
    size_t n = s->lines_cap ? s->lines_cap : 256;
    while (n < need) n *= 2;
    if (!(GROW(s, line_hash, n) && GROW(s, line_chars, n) && GROW(s, line_start, n))) return -1;
    s->lines_cap = n;
    return 0;
}

/* Makes the slots ready for up to n keys (at most half full). */
static int table_begin(Scratch *s, size_t n) {
    size_t size = 16;
    while (size < 2 * n) size *= 2;
    if (size > s->slots_cap) {
        free(s->slots);
        s->slots = calloc(size, sizeof(Slot)); /* gen 0: empty */
        if (!s->slots) { s->slots_cap = 0; return -1; }
        s->slots_cap = size;
        s->gen = 0;
    }
    if (++s->gen == 0) {
        memset(s->slots, 0, s->slots_cap * sizeof(Slot));
        s->gen = 1;
    }
    s->mask = size - 1;
    s->n_groups = 0;
    return 0;
}

/* Counts position p in the group of its key (top 42 bits of a hash) and returns the group; a new group starts
 * at p. Written without branches but the probe, whose outcome (seen before or not) is unpredictable. */
static inline int32_t group_of(Scratch *s, uint64_t key, int32_t p) {
    size_t j = key & s->mask; /* the key's bits are mixed: its low bits spread the slots */
    while (s->slots[j].gen == s->gen && s->slots[j].key != key) j = (j + 1) & s->mask;
    Slot *e = &s->slots[j];
    int fresh = e->gen != s->gen;
    int32_t g = fresh ? (int32_t)s->n_groups : e->group;
    e->gen = s->gen;
    e->key = key;
    e->group = g;
    s->count[g] = fresh ? 1 : s->count[g] + 1;
    s->first[g] = fresh ? p : s->first[g];
    s->n_groups += (size_t)fresh;
    return g;
}

static void scratch_free(Scratch *s) {
    free(s->hash); free(s->gram); free(s->cum); free(s->rep);
    free(s->pos); free(s->grp); free(s->count); free(s->first);
    free(s->line_hash); free(s->line_chars); free(s->line_start); free(s->slots);
}

/* ---------------------------------------------------------------- one document */

typedef struct {
    int64_t words, chars, lines, hashes, ellipses, bullet_lines, ellipsis_lines, terminal_lines, alpha_words;
    int64_t javascript_lines, policy_lines, dup_lines, dup_line_chars;
    int64_t covered[MAX_NGRAM + 1]; /* characters covered by the top (n <= 4) or repeated n-grams */
    uint64_t stop_seen;
    int lorem, curly;
} Counts;

typedef struct {
    uint64_t sum, power; /* sum of word hash * P**k over the line's words so far, and P**k */
    int64_t words, chars;
    size_t start;
    int last_terminal, last_ellipsis; /* of the line's last word so far */
} Line;

static int close_line(Scratch *s, Counts *c, const Line *line) {
    if ((size_t)c->lines == s->lines_cap && grow_lines(s, (size_t)c->lines + 1) < 0) return -1;
    s->line_hash[c->lines] = mix(line->sum + (uint64_t)(line->words - 1));
    s->line_chars[c->lines] = line->chars;
    s->line_start[c->lines] = line->start;
    c->lines++;
    c->terminal_lines += line->last_terminal;
    c->ellipsis_lines += line->last_ellipsis;
    return 0;
}

/* Words, lines, characters and symbols of d[0..n): the counts, per word (hash, characters) and per line
 * (hash, characters, start) in s. */
static int scan(const Kernel *k, Scratch *s, const uint8_t *d, size_t n, Counts *c) {
    const uint8_t *flags = k->flags;
    size_t i = 0, len;
    int new_line = 1, line_open = 0;
    Line line = {0};
    s->cum[0] = 0;
    for (;;) {
        while (i < n) { /* whitespace */
            uint8_t b = d[i];
            if (b < 0x80) {
                if (!(k->cls[b] & F_SPACE)) break;
                new_line |= b == '\n';
                i++;
            } else {
                uint32_t cp = decode(d + i, n - i, &len);
                if (!(flags[cp] & F_SPACE)) break;
                i += len;
            }
        }
        if (i >= n) break;
        size_t start = i;
        if (new_line) {
            if (line_open && close_line(s, c, &line) < 0) return -1;
            memset(&line, 0, sizeof(line));
            line.power = 1;
            line.start = i;
            line_open = 1;
            new_line = 0;
            c->bullet_lines += (flags[decode(d + i, n - i, &len)] & F_BULLET) != 0;
        }
        size_t extra = 0, last_end = 0; /* continuation bytes; where the last multi-byte character ends */
        uint64_t letters = 0;
        unsigned alpha = 0;
        uint32_t last_cp = 0;
        for (;;) { /* the word: runs of plain ASCII bytes 8 at a time, the other bytes one by one */
            if (n - i >= 8) {
                uint64_t x = load_le(d + i, 8), ends = run_ends(x);
                if (!ends) {
                    letters |= letter_bytes(x);
                    i += 8;
                    continue;
                }
                size_t j = lowest_byte(ends);
                letters |= letter_bytes(x) & low_bytes(j);
                i += j;
            } else {
                while (i < n && !(k->cls[d[i]] & (F_SPACE | C_SLOW))) alpha |= k->cls[d[i++]];
                if (i == n) break;
            }
            uint8_t b = d[i], a = k->cls[b];
            if (a & F_SPACE) break;
            if (b >= 0x80) {
                uint32_t cp = decode(d + i, n - i, &len);
                uint8_t f = flags[cp];
                if (f & F_SPACE) break;
                alpha |= f;
                c->ellipses += cp == 0x2026;
                extra += len - 1;
                i += len;
                last_cp = cp;
                last_end = i;
                continue;
            }
            if (b == '.') { /* a run of dots holds run / 3 ellipses (str.count) */
                size_t j = i + 1;
                while (j < n && d[j] == '.') j++;
                c->ellipses += (int64_t)(j - i) / 3;
                i = j;
                continue;
            }
            c->hashes += b == '#';
            c->curly |= b == '{';
            alpha |= a; /* '#', '{' or an ASCII control character: a plain character */
            i++;
        }
        size_t nb = i - start;
        int64_t chars = (int64_t)(nb - extra);
        uint32_t last = last_end == i ? last_cp : d[i - 1];
        uint64_t first = load_upto8(d + start, nb, n - start);
        uint64_t h = word_hash(d + start, nb, n - start, first);
        /* OR 0x20 on the word's bytes lowers ASCII letters and makes no other byte a letter (a NUL becomes a
           space): the folded word is a stop word only where the word is one, in any case */
        uint64_t folded = first | (low_bytes(nb) & 0x2020202020202020ULL);
        size_t slot = (size_t)((folded * k->stop_mul) >> 56);
        c->stop_seen |= (folded == k->stop_slot[slot] && nb <= 8) ? k->stop_bit[slot] : 0;
        size_t w = (size_t)c->words;
        if (w == s->words_cap && grow_words(s, w + 1) < 0) return -1;
        s->hash[w] = h;
        s->cum[w + 1] = s->cum[w] + chars;
        c->words++;
        c->chars += chars;
        c->alpha_words += letters != 0 || (alpha & F_ALPHA);
        line.sum += h * line.power;
        line.power *= P_LINE;
        line.words++;
        line.chars += chars;
        line.last_terminal = (flags[last] & F_TERMINAL) != 0;
        line.last_ellipsis = last == 0x2026 || (nb >= 3 && d[i - 3] == '.' && d[i - 2] == '.' && d[i - 1] == '.');
    }
    if (line_open && close_line(s, c, &line) < 0) return -1;
    return 0;
}

/* The filter's slot of the 4 bytes at p, folded by OR 0x20: a byte and its ASCII lower case fold alike, so a
 * phrase's first 4 bytes and every occurrence of them in a text, in any case, have the same slot. */
static inline unsigned head_slot(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return (uint32_t)((v | 0x20202020u) * 0x9E3779B1u) >> (32 - HEAD_BITS);
}

/* The kinds of the phrases starting at p (avail bytes of the document from there). */
static unsigned match_phrases(const Kernel *k, const uint8_t *p, size_t avail) {
    unsigned kinds = 0;
    for (int j = 0; j < k->n_phrases; j++) {
        const Phrase *ph = &k->phrases[j];
        if (ph->len > avail || (kinds & ph->kind)) continue;
        size_t m = 0;
        while (m < ph->len && k->lower[p[m]] == ph->text[m]) m++;
        if (m == ph->len) kinds |= ph->kind;
    }
    return kinds;
}

/* "lorem ipsum" anywhere, and the lines holding "javascript" or a policy phrase. A phrase starts with an
 * ASCII letter, so inside a word, in the last line starting at or before it. */
static void find_phrases(const Kernel *k, const Scratch *s, const uint8_t *d, size_t n, Counts *c) {
    int64_t javascript_line = -1, policy_line = -1; /* the last line counted: matches come in order */
    for (size_t i = 0; i + MIN_PHRASE <= n; i++) {
        unsigned slot = head_slot(d + i);
        if (!(k->heads[slot >> 3] >> (slot & 7) & 1)) continue;
        unsigned kinds = match_phrases(k, d + i, n - i);
        if (!kinds) continue;
        int64_t lo = 0, hi = c->lines; /* the line: the last start <= i */
        while (hi - lo > 1) {
            int64_t mid = lo + (hi - lo) / 2;
            if (s->line_start[mid] <= i) lo = mid;
            else hi = mid;
        }
        c->lorem |= (kinds & PH_LOREM) != 0;
        if ((kinds & PH_JAVASCRIPT) && lo != javascript_line) {
            c->javascript_lines++;
            javascript_line = lo;
        }
        if ((kinds & PH_POLICY) && lo != policy_line) {
            c->policy_lines++;
            policy_line = lo;
        }
    }
}

/* Lines equal to an earlier line of the document, and their characters. */
static int dup_lines(Scratch *s, Counts *c) {
    if (table_begin(s, (size_t)c->lines) < 0) return -1;
    for (int64_t l = 0; l < c->lines; l++) {
        int32_t g = group_of(s, s->line_hash[l] >> POS_BITS, (int32_t)l);
        int dup = s->count[g] > 1;
        c->dup_lines += dup;
        c->dup_line_chars += dup ? s->line_chars[l] : 0;
    }
    return 0;
}

/* Characters covered by the n-grams at the candidates (increasing) that are selected, each word counted once:
 * those of group `only`, or with only < 0 every repeated one. */
static int64_t covered(const Scratch *s, size_t m, size_t n, int32_t only) {
    int64_t total = 0;
    size_t until = 0; /* words before it are counted */
    for (size_t k = 0; k < m; k++) {
        size_t p = (size_t)s->pos[k], b = p + n, a = p > until ? p : until; /* a <= b: starts increase */
        int chosen = only >= 0 ? s->grp[k] == only : s->rep[p];
        total += chosen ? s->cum[b] - s->cum[a] : 0;
        until = chosen ? b : until;
    }
    return total;
}

/* numpy's _repetition: per n, the candidates are the positions where the (n-1)-grams at i and i + 1 both
 * repeat (every position for n = 1), grouped by the top 42 bits of their n-gram hash. */
static int repetition(Scratch *s, Counts *c) {
    size_t nw = (size_t)c->words;
    if (nw < MIN_NGRAM) return 0;
    if (table_begin(s, nw) < 0) return -1;
    for (size_t i = 0; i < nw; i++) s->grp[i] = group_of(s, s->hash[i] >> POS_BITS, (int32_t)i);
    for (size_t i = 0; i < nw; i++) {
        s->rep[i] = s->count[s->grp[i]] >= 2;
        s->pos[i] = (int32_t)i;
        s->gram[i] = s->hash[i];
    }
    s->rep[nw] = 0; /* read past the last word, never used */
    size_t m = nw;
    for (size_t n = MIN_NGRAM; n <= MAX_NGRAM; n++) {
        size_t kept = 0;
        for (size_t k = 0; k < m; k++) { /* in place, without branches; rep stays set only at the candidates */
            size_t p = (size_t)s->pos[k];
            unsigned keep = (unsigned)(p + n <= nw) & s->rep[p] & s->rep[p + 1];
            s->rep[p] = 0;
            s->pos[kept] = (int32_t)p;
            kept += keep;
        }
        m = kept;
        if (!m) break;
        if (table_begin(s, m) < 0) return -1;
        for (size_t k = 0; k < m; k++) {
            size_t p = (size_t)s->pos[k];
            s->gram[p] = mix(s->gram[p] * K3 + s->hash[p + n - 1]);
            s->grp[k] = group_of(s, s->gram[p] >> POS_BITS, (int32_t)p);
        }
        for (size_t k = 0; k < m; k++) s->rep[s->pos[k]] = s->count[s->grp[k]] >= 2;
        if (n <= MAX_TOP_NGRAM) {
            /* the most members, then the most characters at the first member, then the earliest (groups are
               numbered in the order of their first members) */
            int32_t best = -1, best_count = 1;
            int64_t best_chars = 0;
            for (size_t g = 0; g < s->n_groups; g++) {
                int32_t f = s->first[g];
                int64_t chars = s->cum[(size_t)f + n] - s->cum[f];
                if (s->count[g] > best_count || (s->count[g] == best_count && best >= 0 && chars > best_chars)) {
                    best = (int32_t)g;
                    best_count = s->count[g];
                    best_chars = chars;
                }
            }
            if (best >= 0) c->covered[n] = covered(s, m, n, best);
        } else {
            c->covered[n] = covered(s, m, n, -1);
        }
    }
    for (size_t k = 0; k < m; k++) s->rep[s->pos[k]] = 0;
    return 0;
}

static void write_stats(const Counts *c, double *out, size_t n_docs, size_t i) {
    double per_w = (double)(c->words > 1 ? c->words : 1);
    double per_l = (double)(c->lines > 1 ? c->lines : 1);
    double per_c = (double)(c->chars > 1 ? c->chars : 1);
    int stops = 0;
    for (uint64_t m = c->stop_seen; m; m &= m - 1) stops++;
    double v[N_STATS];
    v[ST_WORDS] = (double)c->words;
    v[ST_CHARS] = (double)c->chars;
    v[ST_LINES] = (double)c->lines;
    v[ST_MEAN_WORD_LENGTH] = (double)c->chars / per_w;
    v[ST_SYMBOL_WORD_RATIO] = (double)(c->hashes > c->ellipses ? c->hashes : c->ellipses) / per_w;
    v[ST_BULLET_LINES] = (double)c->bullet_lines / per_l;
    v[ST_ELLIPSIS_LINES] = (double)c->ellipsis_lines / per_l;
    v[ST_ALPHA_WORDS] = (double)c->alpha_words / per_w;
    v[ST_STOP_WORDS] = (double)stops;
    v[ST_DUP_LINES] = (double)c->dup_lines / per_l;
    v[ST_DUP_LINE_CHARS] = (double)c->dup_line_chars / per_c;
    for (int n = MIN_NGRAM; n <= MAX_NGRAM; n++) v[ST_TOP_2GRAM + n - MIN_NGRAM] = (double)c->covered[n] / per_c;
    v[ST_TERMINAL_LINES] = (double)c->terminal_lines / per_l;
    v[ST_LOREM_IPSUM] = c->lorem ? 1.0 : 0.0;
    v[ST_CURLY_BRACKET] = c->curly ? 1.0 : 0.0;
    v[ST_JAVASCRIPT_LINES] = (double)c->javascript_lines / per_l;
    v[ST_POLICY_LINES] = (double)c->policy_lines / per_l;
    for (int k = 0; k < N_STATS; k++) out[(size_t)k * n_docs + i] = v[k];
}

/* Every document; -1 when memory ran out. Runs without the GIL. */
static int run(const Kernel *k, const uint8_t *data, const int64_t *offsets, size_t n_docs, double *out) {
    Scratch s = {0};
    int rc = -1;
    if (grow_words(&s, 1) < 0 || grow_lines(&s, 1) < 0) goto done;
    for (size_t i = 0; i < n_docs; i++) {
        const uint8_t *d = data + offsets[i];
        size_t n = (size_t)(offsets[i + 1] - offsets[i]);
        Counts c = {0};
        if (scan(k, &s, d, n, &c) < 0 || dup_lines(&s, &c) < 0 || repetition(&s, &c) < 0) goto done;
        find_phrases(k, &s, d, n, &c);
        write_stats(&c, out, n_docs, i);
    }
    rc = 0;
done:
    scratch_free(&s);
    return rc;
}

/* ---------------------------------------------------------------- the type */

/* The bytes of item i of a sequence, copied into buf (at most cap bytes); -1 with an exception set. */
static Py_ssize_t item_bytes(PyObject *seq, Py_ssize_t i, uint8_t *buf, size_t cap, const char *what) {
    PyObject *item = PySequence_GetItem(seq, i);
    if (!item) return -1;
    char *p;
    Py_ssize_t n = -1;
    if (PyBytes_AsStringAndSize(item, &p, &n) == 0) {
        if ((size_t)n > cap || n < 1) {
            PyErr_Format(PyExc_ValueError, "%s: each must hold 1 to %zu bytes", what, cap);
            n = -1;
        } else {
            memcpy(buf, p, (size_t)n);
        }
    }
    Py_DECREF(item);
    return n;
}

static int set_stop_words(Kernel *self, PyObject *seq) {
    Py_ssize_t count = PySequence_Size(seq);
    if (count < 0) return -1;
    if (count > MAX_STOP) {
        PyErr_Format(PyExc_ValueError, "stop_words: at most %d", MAX_STOP);
        return -1;
    }
    uint64_t packed[MAX_STOP];
    for (Py_ssize_t i = 0; i < count; i++) {
        uint8_t w[8];
        Py_ssize_t n = item_bytes(seq, i, w, 8, "stop_words");
        if (n < 0) return -1;
        for (Py_ssize_t j = 0; j < n; j++) {
            if (w[j] < 'a' || w[j] > 'z') {
                PyErr_SetString(PyExc_ValueError, "stop_words: lower-case ASCII letters only");
                return -1;
            }
        }
        packed[i] = load_le(w, (size_t)n);
        for (Py_ssize_t j = 0; j < i; j++) {
            if (packed[j] == packed[i]) {
                PyErr_SetString(PyExc_ValueError, "stop_words: a word is there twice");
                return -1;
            }
        }
    }
    /* the next odd multiple of K3 until the top 8 bits of word * multiplier differ for every word */
    for (uint64_t mul = K3, tries = 0; tries < (1 << 20); mul += 2 * K3, tries++) {
        uint8_t used[256] = {0};
        Py_ssize_t i = 0;
        while (i < count && !used[(packed[i] * mul) >> 56]) used[(packed[i++] * mul) >> 56] = 1;
        if (i < count) continue;
        self->stop_mul = mul;
        memset(self->stop_slot, 0, sizeof(self->stop_slot));
        memset(self->stop_bit, 0, sizeof(self->stop_bit));
        for (i = 0; i < count; i++) {
            self->stop_slot[(packed[i] * mul) >> 56] = packed[i];
            self->stop_bit[(packed[i] * mul) >> 56] = 1ULL << i;
        }
        return 0;
    }
    PyErr_SetString(PyExc_ValueError, "stop_words: no perfect hash found");
    return -1;
}

static int add_phrases(Kernel *self, PyObject *seq, unsigned kind, const char *what) {
    Py_ssize_t count = PySequence_Size(seq);
    if (count < 0) return -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (self->n_phrases == MAX_PHRASES) {
            PyErr_Format(PyExc_ValueError, "at most %d phrases", MAX_PHRASES);
            return -1;
        }
        Phrase *ph = &self->phrases[self->n_phrases];
        Py_ssize_t n = item_bytes(seq, i, ph->text, MAX_PHRASE, what);
        if (n < 0) return -1;
        int ok = n >= MIN_PHRASE && ph->text[0] >= 'a' && ph->text[0] <= 'z';
        for (Py_ssize_t j = 0; j < n; j++)
            ok &= ph->text[j] >= 0x20 && ph->text[j] < 0x7F && !(ph->text[j] >= 'A' && ph->text[j] <= 'Z');
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "%s: a phrase must be printable lower-case ASCII of 4 bytes or more, "
                         "starting with a letter", what);
            return -1;
        }
        ph->len = (size_t)n;
        ph->kind = kind;
        self->n_phrases++;
        unsigned slot = head_slot(ph->text);
        self->heads[slot >> 3] |= (uint8_t)(1u << (slot & 7));
    }
    return 0;
}

static int Kernel_init(Kernel *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"flags", "stop_words", "lorem", "javascript", "policy", NULL};
    PyObject *flags, *stop_words, *lorem, *javascript, *policy;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SOOOO", names, &flags, &stop_words, &lorem, &javascript, &policy))
        return -1;
    if (self->flags_obj) { /* stats() may be running without the GIL: the tables must not change */
        PyErr_SetString(PyExc_TypeError, "Kernel is already initialised");
        return -1;
    }
    if (PyBytes_Size(flags) != N_CODE_POINTS) {
        PyErr_SetString(PyExc_ValueError, "flags must hold one byte per code point (0x110000)");
        return -1;
    }
    const uint8_t *f = (const uint8_t *)PyBytes_AsString(flags);
    for (int b = 0; b < 0x80; b++) { /* what the 8-byte scan of plain ASCII assumes */
        int letter = (b | 0x20) >= 'a' && (b | 0x20) <= 'z';
        if (!(f[b] & F_ALPHA) != !letter || ((f[b] & F_SPACE) && b > ' ')) {
            PyErr_SetString(PyExc_ValueError, "flags: the ASCII letters must be A-Z and a-z, and no ASCII "
                            "whitespace may be above the space");
            return -1;
        }
        self->cls[b] = (uint8_t)(f[b] | ((b == '#' || b == '.' || b == '{') ? C_SLOW : 0));
    }
    for (int b = 0x80; b < 256; b++) self->cls[b] = C_SLOW;
    for (int b = 0; b < 256; b++) self->lower[b] = (uint8_t)((b >= 'A' && b <= 'Z') ? b + 0x20 : b);
    self->n_phrases = 0;
    memset(self->heads, 0, sizeof(self->heads));
    if (set_stop_words(self, stop_words) < 0 || add_phrases(self, lorem, PH_LOREM, "lorem") < 0
        || add_phrases(self, javascript, PH_JAVASCRIPT, "javascript") < 0
        || add_phrases(self, policy, PH_POLICY, "policy") < 0)
        return -1;
    Py_INCREF(flags);
    self->flags_obj = flags;
    self->flags = f;
    return 0;
}

static PyObject *Kernel_stats(Kernel *self, PyObject *args) {
    Py_buffer data, offsets, out;
    if (!self->flags) {
        PyErr_SetString(PyExc_ValueError, "Kernel not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*y*w*", &data, &offsets, &out)) return NULL;
    PyObject *result = NULL;
    const int64_t *off = offsets.buf;
    size_t n_offsets = (size_t)offsets.len / sizeof(int64_t);
    if ((size_t)offsets.len % sizeof(int64_t) || n_offsets < 1 || (uintptr_t)offsets.buf % sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "offsets must be an aligned buffer of int64, one more than the documents");
        goto done;
    }
    size_t n_docs = n_offsets - 1;
    if ((size_t)out.len != N_STATS * n_docs * sizeof(double) || (uintptr_t)out.buf % sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "out must be an aligned float64 buffer of %d x %zu", N_STATS, n_docs);
        goto done;
    }
    for (size_t i = 0; i < n_docs; i++) {
        if (off[i] < 0 || off[i + 1] < off[i] || off[i + 1] > (int64_t)data.len
            || (size_t)(off[i + 1] - off[i]) > MAX_DOC_BYTES) {
            PyErr_Format(PyExc_ValueError, "offsets %zu..%zu do not delimit a document of the data", i, i + 1);
            goto done;
        }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run(self, data.buf, off, n_docs, out.buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    return result;
}

static void Kernel_dealloc(Kernel *self) {
    Py_XDECREF(self->flags_obj);
    PyTypeObject *type = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type); /* a heap type: its instances hold a reference */
}

static PyMethodDef Kernel_methods[] = {
    {"stats", (PyCFunction)Kernel_stats, METH_VARARGS,
     "stats(data, offsets, out): the statistics of every document into out (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Kernel_slots[] = {
    {Py_tp_doc, "The text statistics of quadmix_udfs.text_stats over UTF-8 documents (see the module source)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Kernel_init},
    {Py_tp_dealloc, Kernel_dealloc},
    {Py_tp_methods, Kernel_methods},
    {0, NULL},
};

static PyType_Spec Kernel_spec = {
    "quadmix_udfs._text_stats_native.Kernel", sizeof(Kernel), 0, Py_TPFLAGS_DEFAULT, Kernel_slots,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_text_stats_native", "Compiled kernel of quadmix_udfs.text_stats.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__text_stats_native(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *type = PyType_FromSpec(&Kernel_spec);
    if (!type || PyModule_AddObject(m, "Kernel", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *names = PyTuple_New(N_STATS);
    if (!names) {
        Py_DECREF(m);
        return NULL;
    }
    for (int k = 0; k < N_STATS; k++) {
        PyObject *s = PyUnicode_FromString(STAT_NAMES[k]);
        if (!s) {
            Py_DECREF(names);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SetItem(names, k, s); /* steals s */
    }
    if (PyModule_AddObject(m, "STATS", names) < 0) {
        Py_DECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
