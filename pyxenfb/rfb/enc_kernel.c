/* Per-tile encoder loops that numpy cannot do fast: Hextile, ZRLE's tiles.
 *
 * Built by hatch_build.py into pyxenfb/rfb/_enc_kernel.so (libc only) and
 * called through cffi (pyxenfb/rfb/enc_kernel.py).  The output is byte for
 * byte that of the numpy twins, encodings.hextile_plan and encodings.zrle_plan (a
 * hypothesis test checks it); the rules are documented there.
 *
 * Pixels are read as little-endian integers of 1, 2 or 4 bytes, as the numpy
 * side views them, and written back as their original bytes.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TILE 16
#define SLOTS 512               /* > 256 pixels: the hash never fills */

/* Bumped with every change to the output of a function here: enc_kernel.py
 * refuses a library built from another version (an editable install not
 * rebuilt after a pull) and uses the numpy twins instead. */
int pyxenfb_enc_version(void)
{
    return 2;
}

enum { HT_RAW = 1, HT_BG = 2, HT_FG = 4, HT_ANY = 8, HT_COLOURED = 16 };
enum { LAST_NONE, LAST_RAW, LAST_MONO, LAST_COLOURED };

static uint8_t *store(uint8_t *o, uint32_t v, int bpp)
{
    for (int i = 0; i < bpp; i++)
        *o++ = (uint8_t)(v >> (8 * i));
    return o;
}

/* Colour counting for one tile: open addressing; a slot belongs to this
 * tile when its generation is the current one (no clearing per tile). */
struct slot {
    uint32_t key;
    uint16_t n;
    uint16_t gen;
};

struct counts {
    struct slot s[SLOTS];
    uint16_t now;
};

/* One subrectangle of a tile: colour, position, size. */
struct sub {
    uint32_t c;
    uint8_t x, y, w, h;
};

/* The colour of the most subrectangles; ties: the smallest value. */
static uint32_t majority(struct counts *c, const struct sub *s, int n)
{
    uint32_t best = 0;
    int best_n = 0;
    if (++c->now == 0) {                             /* generations wrapped: start afresh */
        memset(c->s, 0, sizeof c->s);
        c->now = 1;
    }
    for (int i = 0; i < n; i++) {
        uint32_t v = s[i].c;
        uint32_t h = (v * 2654435761u) >> 23;        /* 9 bits */
        struct slot *e = &c->s[h];
        while (e->gen == c->now && e->key != v) {
            h = (h + 1) & (SLOTS - 1);
            e = &c->s[h];
        }
        if (e->gen != c->now) {
            e->gen = c->now;
            e->key = v;
            e->n = 0;
        }
        int k = ++e->n;
        if (k > best_n || (k == best_n && v < best)) {
            best_n = k;
            best = v;
        }
    }
    return best;
}

static void load_tile(uint32_t *t, const uint8_t *src, long stride, int th, int tw, int bpp)
{
    for (int y = 0; y < th; y++, src += stride, t += TILE) {
        const uint8_t *p = src;
        switch (bpp) {
        case 1:
            for (int x = 0; x < tw; x++)
                t[x] = p[x];
            break;
        case 2:
            for (int x = 0; x < tw; x++, p += 2)
                t[x] = (uint32_t)p[0] | (uint32_t)p[1] << 8;
            break;
        default:
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            /* already the little-endian values; a whole tile row is a
             * fixed-size copy the compiler inlines (no call, no rep movs) */
            if (tw == TILE)
                memcpy(t, p, TILE * 4);
            else
                memcpy(t, p, (size_t)tw * 4);
            break;
#endif
            for (int x = 0; x < tw; x++, p += 4)
                t[x] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        }
    }
}

/* The tile's subrectangles, in the order they are found (raster order of
 * their corners); returns their number.  At each pixel no earlier one
 * covers: as wide as its colour runs to the right in its row (over covered
 * pixels too), as tall as all those columns keep the colour below.  They
 * may overlap (same colour, painted twice): fewer than a partition into
 * rectangles on glyph strokes, e.g. one for a stem crossed by a bar. */
static int cover(const uint32_t *t, int th, int tw, struct sub *s)
{
    uint8_t until[TILE] = {0};              /* rows above this are covered, per column */
    int n = 0;
    for (int y = 0; y < th; y++) {
        const uint32_t *line = t + y * TILE;
        for (int x = 0; x < tw;) {
            if (until[x] > y) {
                x++;
                continue;
            }
            uint32_t c = line[x];
            int x1 = x + 1;
            while (x1 < tw && line[x1] == c)
                x1++;
            int y1 = y + 1;
            for (; y1 < th; y1++) {         /* rows below holding c in all these columns */
                const uint32_t *below = t + y1 * TILE;
                int i = x;
                while (i < x1 && below[i] == c)
                    i++;
                if (i < x1)
                    break;
            }
            s[n].c = c;
            s[n].x = (uint8_t)x;
            s[n].y = (uint8_t)y;
            s[n].w = (uint8_t)(x1 - x);
            s[n].h = (uint8_t)(y1 - y);
            n++;
            if (y1 > y + 1)
                for (int i = x; i < x1; i++)
                    if (until[i] < y1)
                        until[i] = (uint8_t)y1;
            x = x1;
        }
    }
    return n;
}

/* Hextile-encode the w x h rectangle at pix (rows `stride` bytes apart,
 * `bpp` bytes a pixel: 1, 2 or 4) into out; returns the length, or -1 when
 * the arguments are invalid or out (cap bytes) is too small.  Needs at most
 * w * h * bpp + (number of tiles) bytes. */
long pyxenfb_hextile(const uint8_t *pix, long stride, int w, int h, int bpp, uint8_t *out, long cap)
{
    /* On the stack, cleared once a call: a thread-local here cost a
     * __tls_get_addr per tile (a third of the kernel's time). */
    struct counts counts;
    uint32_t t[TILE * TILE];
    struct sub subs[TILE * TILE];
    uint8_t *o = out, *end = out + cap;
    int prev_raw = 1, last = LAST_NONE;
    uint32_t prev_bg = 0, last_fg = 0;

    if (w <= 0 || h <= 0 || (bpp != 1 && bpp != 2 && bpp != 4) || stride < (long)w * bpp)
        return -1;
    memset(&counts, 0, sizeof counts);
    for (int ty = 0; ty < h; ty += TILE) {
        int th = h - ty < TILE ? h - ty : TILE;
        for (int tx = 0; tx < w; tx += TILE) {
            int tw = w - tx < TILE ? w - tx : TILE;
            const uint8_t *src = pix + ty * stride + (long)tx * bpp;
            load_tile(t, src, stride, th, tw, bpp);
            int nsubs = cover(t, th, tw, subs);
            uint32_t bg = nsubs == 1 ? subs[0].c : majority(&counts, subs, nsubs);

            int k = 0, mono = 1;
            uint32_t fg = 0;
            for (int i = 0; i < nsubs; i++) {
                if (subs[i].c == bg)
                    continue;
                if (k == 0)
                    fg = subs[i].c;
                else if (subs[i].c != fg)
                    mono = 0;
                k++;
            }
            int has = k > 0;
            int coloured = has && !mono;
            mono = has && mono;
            long raw_size = 1 + (long)th * tw * bpp;
            long bound = coloured ? 2 + bpp + (long)(bpp + 2) * k : mono ? 2 + 2 * bpp + 2L * k : 1 + bpp;
            int raw = raw_size < bound;
            if (raw) {
                if (end - o < raw_size)
                    return -1;
                *o++ = HT_RAW;
                for (int y = 0; y < th; y++, o += (long)tw * bpp)
                    memcpy(o, src + y * stride, (size_t)tw * bpp);
                prev_raw = 1;
                prev_bg = bg;
                last = LAST_RAW;
                continue;
            }
            int send_bg = prev_raw || bg != prev_bg;
            int send_fg = mono && !(last == LAST_MONO && last_fg == fg);
            if (end - o < bound)
                return -1;
            *o++ = (uint8_t)((send_bg ? HT_BG : 0) | (send_fg ? HT_FG : 0) | (has ? HT_ANY : 0) |
                             (coloured ? HT_COLOURED : 0));
            if (send_bg)
                o = store(o, bg, bpp);
            if (send_fg)
                o = store(o, fg, bpp);
            if (has) {
                *o++ = (uint8_t)k;
                for (int i = 0; i < nsubs; i++) {
                    const struct sub *r = &subs[i];
                    if (r->c == bg)
                        continue;
                    if (coloured)
                        o = store(o, r->c, bpp);
                    *o++ = (uint8_t)(r->x << 4 | r->y);
                    *o++ = (uint8_t)((r->w - 1) << 4 | (r->h - 1));
                }
                last = coloured ? LAST_COLOURED : LAST_MONO;
                last_fg = fg;
            }
            prev_raw = 0;
            prev_bg = bg;
        }
    }
    return (long)(o - out);
}

/* ---- ZRLE ---------------------------------------------------------------- */

#define ZTILE 64
#define ZSLOTS 256              /* palettes of at most 127 colours */
#define RLE_GAIN 8              /* encodings._RLE_GAIN: why, there */

static int len_bytes(int run)   /* run - 1 as 255, 255, ..., rest */
{
    return (run - 1) / 255 + 1;
}

static uint8_t *put_len(uint8_t *o, int run)
{
    int n = run - 1;
    for (; n >= 255; n -= 255)
        *o++ = 255;
    *o++ = (uint8_t)n;
    return o;
}

/* Write the ZRLE tile stream (before deflate) of the w x h rectangle at pix:
 * per 64x64 tile the form encodings.zrle_plan describes.  A CPIXEL is
 * bytes [coff, coff + cb) of each pixel.  Palettes list colours in order of
 * first appearance.  Returns the length, or -1 (invalid arguments, or out
 * too small: w * h * cb + number of tiles always suffices). */
long pyxenfb_zrle_tiles(const uint8_t *pix, long stride, int w, int h, int bpp, int coff, int cb,
                        uint8_t *out, long cap)
{
    static __thread uint32_t t_buf[ZTILE * ZTILE];
    static __thread uint8_t idx_buf[ZTILE * ZTILE];
    /* the thread's buffers looked up once, not once per use (-fPIC TLS) */
    uint32_t *const t = t_buf;
    uint8_t *const idx = idx_buf;
    uint32_t key[ZSLOTS], pal_px[128];
    int16_t slot_of[ZSLOTS];
    uint8_t *o = out, *end = out + cap;

    if (w <= 0 || h <= 0 || (bpp != 1 && bpp != 2 && bpp != 4) || stride < (long)w * bpp ||
        coff < 0 || cb <= 0 || coff + cb > bpp)
        return -1;
    for (int ty = 0; ty < h; ty += ZTILE) {
        int th = h - ty < ZTILE ? h - ty : ZTILE;
        for (int tx = 0; tx < w; tx += ZTILE) {
            int tw = w - tx < ZTILE ? w - tx : ZTILE;
            int n = th * tw;
            const uint8_t *src = pix + ty * stride + (long)tx * bpp;
            /* values in the tile's raster order, palette, runs */
            for (int y = 0; y < th; y++) {
                const uint8_t *p = src + y * stride;
                uint32_t *d = t + y * tw;
                for (int x = 0; x < tw; x++, p += bpp) {
                    uint32_t v = p[0];
                    if (bpp > 1)
                        v |= (uint32_t)p[1] << 8;
                    if (bpp > 2)
                        v |= (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
                    d[x] = v;
                }
            }
            memset(slot_of, -1, sizeof slot_of);
            int k = 0;
            long runs = 0, run_len_bytes = 0, prle_len_bytes = 0;
            for (int i = 0; i < n;) {
                uint32_t v = t[i];
                int j = i + 1;
                while (j < n && t[j] == v)
                    j++;
                int run = j - i;
                runs++;
                run_len_bytes += len_bytes(run);
                if (run > 1)
                    prle_len_bytes += len_bytes(run);
                if (k <= 127) {
                    uint32_t s = (v * 2654435761u) >> 24;
                    while (slot_of[s] >= 0 && key[s] != v)
                        s = (s + 1) & (ZSLOTS - 1);
                    if (slot_of[s] < 0) {
                        if (k < 128) {
                            key[s] = v;
                            slot_of[s] = (int16_t)k;
                            pal_px[k] = v;
                        }
                        k++;                /* 128 means: too many */
                    }
                    if (k <= 127)
                        memset(idx + i, slot_of[s], (size_t)run);
                }
                i = j;
            }
            /* the plain form unless a run-length form is RLE_GAIN times smaller */
            int bits = k <= 2 ? 1 : k <= 4 ? 2 : 4;
            long best, size;
            int kind;
            size = 1 + (long)n * cb;
            kind = 0;
            long packed = 1 + (long)k * cb + (long)th * ((tw * bits + 7) / 8);
            if (k <= 16 && packed <= size) {
                size = packed;
                kind = 2;
            }
            best = size;
            long plain = 1 + runs * cb + run_len_bytes;
            if (plain * RLE_GAIN <= best) {
                best = plain * RLE_GAIN;
                size = plain;
                kind = 128;
            }
            long prle = 1 + (long)k * cb + runs + prle_len_bytes;
            if (k <= 127 && prle * RLE_GAIN <= best) {
                best = prle * RLE_GAIN;
                size = prle;
                kind = 130;
            }
            if (k == 1) {
                size = 1 + cb;
                kind = 1;
            }
            best = size;
            if (end - o < best)
                return -1;
            uint8_t *start = o;
            if (kind == 0) {
                *o++ = 0;
                for (int y = 0; y < th; y++) {
                    const uint8_t *p = src + y * stride + coff;
                    if (cb == 3 && bpp == 4) {
                        /* 3-byte CPIXELs (the common case): a fixed-size
                         * 4-byte copy per pixel, its 4th byte overwritten
                         * by the next pixel's; the row's last pixel copies
                         * 3, so nothing goes past this tile's bytes. */
                        int x = 0;
                        for (; x < tw - 1; x++, p += 4, o += 3)
                            memcpy(o, p, 4);
                        memcpy(o, p, 3);
                        o += 3;
                        continue;
                    }
                    for (int x = 0; x < tw; x++, p += bpp, o += cb)
                        memcpy(o, p, (size_t)cb);
                }
            } else if (kind == 1) {
                *o++ = 1;
                memcpy(o, src + coff, (size_t)cb);
                o += cb;
            } else if (kind == 128) {
                *o++ = 128;
                for (int i = 0; i < n;) {
                    int j = i + 1;
                    while (j < n && t[j] == t[i])
                        j++;
                    int y = i / tw, x = i % tw;
                    memcpy(o, src + y * stride + (long)x * bpp + coff, (size_t)cb);
                    o = put_len(o + cb, j - i);
                    i = j;
                }
            } else {
                *o++ = (uint8_t)(kind == 2 ? k : 128 + k);
                for (int c = 0; c < k; c++)
                    for (int b = 0; b < cb; b++)
                        *o++ = (uint8_t)(pal_px[c] >> (8 * (coff + b)));
                if (kind == 2) {
                    for (int y = 0; y < th; y++) {
                        const uint8_t *row = idx + y * tw;
                        int acc = 0, nb = 0;
                        for (int x = 0; x < tw; x++) {
                            acc = acc << bits | row[x];
                            nb += bits;
                            if (nb == 8) {
                                *o++ = (uint8_t)acc;
                                acc = nb = 0;
                            }
                        }
                        if (nb)
                            *o++ = (uint8_t)(acc << (8 - nb));
                    }
                } else {
                    for (int i = 0; i < n;) {
                        int j = i + 1;
                        while (j < n && t[j] == t[i])
                            j++;
                        if (j - i == 1) {
                            *o++ = idx[i];
                        } else {
                            *o++ = (uint8_t)(idx[i] | 128);
                            o = put_len(o, j - i);
                        }
                        i = j;
                    }
                }
            }
            if (o - start != best)
                return -1;                  /* a size rule and its writer disagree */
        }
    }
    return (long)(o - out);
}

/* ---- Tight's gradient filter --------------------------------------------- */

/* out = each byte of the w x h 3-byte-per-pixel image minus its prediction
 * clamp(left + up - upleft, 0, 255), mod 256; neighbours outside are 0. */
void pyxenfb_gradient24(const uint8_t *rgb, int w, int h, uint8_t *out)
{
    long row = 3L * w;
    for (int y = 0; y < h; y++) {
        const uint8_t *cur = rgb + y * row;
        uint8_t *o = out + y * row;
        if (y == 0) {                       /* only the left neighbour: p = left */
            for (long i = 0; i < row && i < 3; i++)
                o[i] = cur[i];
            for (long i = 3; i < row; i++)
                o[i] = (uint8_t)(cur[i] - cur[i - 3]);
            continue;
        }
        const uint8_t *up = cur - row;
        for (long i = 0; i < row && i < 3; i++)   /* only the one above: p = up */
            o[i] = (uint8_t)(cur[i] - up[i]);
        for (long i = 3; i < row; i++) {    /* branch-free: the compiler vectorises it */
            int p = cur[i - 3] + up[i] - up[i - 3];
            p = p < 0 ? 0 : p;
            p = p > 255 ? 255 : p;
            o[i] = (uint8_t)(cur[i] - p);
        }
    }
}

/* ---- Tight's palette ------------------------------------------------------ */

#define PSLOTS 1024             /* palettes of at most 256 colours */

/* A pixel of bpp (1, 2 or 4) bytes, read as a little-endian integer. */
static inline uint32_t pixel_value(const uint8_t *p, int bpp)
{
    uint32_t v = p[0];
    if (bpp > 1)
        v |= (uint32_t)p[1] << 8;
    if (bpp > 2)
        v |= (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return v;
}

/* Its first slot in the open-addressed table (multiplicative hash, 10 bits). */
static inline uint32_t slot_of(uint32_t v)
{
    return (v * 2654435761u) >> 22;
}

/* The distinct values of the n pixels at pix (bpp bytes each, read as
 * little-endian integers) into pal, ascending, and each pixel's index in
 * it into idx; returns their number, or -1 when there are more than limit
 * (<= 256), stopping there. */
int pyxenfb_palette(const uint8_t *pix, long n, int bpp, int limit, uint32_t *pal, uint8_t *idx)
{
    uint32_t key[PSLOTS];
    int16_t rank[PSLOTS];
    int k = 0;

    if (n <= 0 || limit < 1 || limit > 256 || (bpp != 1 && bpp != 2 && bpp != 4))
        return -1;
    memset(rank, -1, sizeof rank);
    uint32_t prev = 0;
    int have_prev = 0;
    for (long i = 0; i < n; i++) {
        uint32_t v = pixel_value(pix + i * bpp, bpp);
        if (have_prev && v == prev)
            continue;
        prev = v;
        have_prev = 1;
        uint32_t s = slot_of(v);
        while (rank[s] >= 0 && key[s] != v)
            s = (s + 1) & (PSLOTS - 1);
        if (rank[s] < 0) {
            if (k == limit)
                return -1;
            key[s] = v;
            rank[s] = 0;
            pal[k++] = v;
        }
    }
    for (int i = 1; i < k; i++) {               /* ascending: at most 256 values */
        uint32_t v = pal[i];
        int j = i - 1;
        for (; j >= 0 && pal[j] > v; j--)
            pal[j + 1] = pal[j];
        pal[j + 1] = v;
    }
    for (int j = 0; j < k; j++) {
        uint32_t s = slot_of(pal[j]);
        while (key[s] != pal[j])
            s = (s + 1) & (PSLOTS - 1);
        rank[s] = (int16_t)j;
    }
    uint8_t last = 0;
    have_prev = 0;
    for (long i = 0; i < n; i++) {
        uint32_t v = pixel_value(pix + i * bpp, bpp);
        if (!have_prev || v != prev) {
            uint32_t s = slot_of(v);
            while (key[s] != v)
                s = (s + 1) & (PSLOTS - 1);
            last = (uint8_t)rank[s];
            prev = v;
            have_prev = 1;
        }
        idx[i] = last;
    }
    return k;
}
