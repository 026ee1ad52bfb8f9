/*
 * ckpt-oracle: an independent checker of SOCI gzip checkpoint blobs, written from
 * shared/docs/soci-format.md §3 (not from soci-ts's TypeScript), on real zlib.
 *
 *   ckpt-oracle BLOB LAYER.gz [LEN]
 *       For every checkpoint k: raw inflater, inflatePrime with the top `bits` bits of the
 *       byte at in-1, the 32 KiB window as dictionary, inflate from `in` producing LEN bytes
 *       (default 65536; fewer at stream end; member ends are crossed). Prints
 *         # layout=v2|v1 count=N span_size=S blob_size=B
 *         k in out bits sha256(produced) nproduced sha256(window)
 *       or, when inflating fails,  k in out bits ERROR nproduced reason...
 *   ckpt-oracle --spans BLOB LAYER.gz
 *       Prints "i start end" per span: [in_i - (bits_i > 0), in_{i+1}), the last to file end.
 *   ckpt-oracle --build SPAN LAYER.gz OUT_BLOB
 *       Writes the v2 blob that §3's building rule gives (zlib, Z_BLOCK, strict '>').
 *   ckpt-oracle --members LAYER.gz
 *       Prints "i start end header_len usize" per gzip member.
 *
 * Exit status: 0 ok, 1 usage or I/O error, 2 malformed blob (or not matching the layer),
 * 3 at least one checkpoint failed to inflate.
 *
 * Build: cc -O2 -o ckpt-oracle ckpt-oracle.c -lz
 */
#define _FILE_OFFSET_BITS 64
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define WIN 32768
#define CP_SIZE (8 + 8 + 1 + WIN)
#define BLOB_HEADER 12
#define CHUNK 65536

static void die(int code, const char *fmt, ...) {
    va_list ap;
    fputs("ckpt-oracle: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

/* ---- SHA-256 (FIPS 180-4), small and self-contained ---- */

typedef struct {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    size_t n;
} sha256_ctx;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256_ctx *c, const uint8_t *p) {
    uint32_t w[64], a, b, d, e, f, g, h, cc, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3];
    e = c->h[4]; f = c->h[5]; g = c->h[6]; h = c->h[7];
    for (i = 0; i < 64; i++) {
        t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
        h = g; g = f; f = e; e = d + t1;
        d = cc; cc = b; b = a; a = t1 + t2;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
    c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

static void sha256_init(sha256_ctx *c) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv);
    c->len = 0;
    c->n = 0;
}

static void sha256_update(sha256_ctx *c, const uint8_t *p, size_t len) {
    c->len += len;
    while (len > 0) {
        size_t take = 64 - c->n;
        if (take > len) take = len;
        memcpy(c->buf + c->n, p, take);
        c->n += take;
        p += take;
        len -= take;
        if (c->n == 64) {
            sha256_block(c, c->buf);
            c->n = 0;
        }
    }
}

static void sha256_hex(sha256_ctx *c, char out[65]) {
    uint64_t bits = c->len * 8;
    uint8_t pad = 0x80, zero = 0, lenb[8];
    int i;
    sha256_update(c, &pad, 1);
    while (c->n != 56) sha256_update(c, &zero, 1);
    for (i = 0; i < 8; i++) lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(c, lenb, 8);
    for (i = 0; i < 8; i++) sprintf(out + 8 * i, "%08" PRIx32, c->h[i]);
    out[64] = 0;
}

/* ---- blob ---- */

typedef struct {
    int64_t in, out;
    int bits;
    const uint8_t *window; /* NULL: all zeros (v1's implied checkpoint 0) */
} checkpoint;

typedef struct {
    int v1;
    int32_t count;
    int64_t span_size;
    long blob_size;
    uint8_t *data;
    checkpoint *cps;
} blob;

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void put_le64(uint8_t *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint8_t *read_all(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;
    if (f == NULL) die(1, "%s: %s", path, strerror(errno));
    if (fseeko(f, 0, SEEK_END) != 0 || (n = (long)ftello(f)) < 0 || fseeko(f, 0, SEEK_SET) != 0)
        die(1, "%s: cannot size: %s", path, strerror(errno));
    buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf == NULL) die(1, "%s: out of memory", path);
    if (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) die(1, "%s: short read", path);
    fclose(f);
    *size = n;
    return buf;
}

static int64_t file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    int64_t n;
    if (f == NULL) die(1, "%s: %s", path, strerror(errno));
    if (fseeko(f, 0, SEEK_END) != 0) die(1, "%s: cannot seek", path);
    n = (int64_t)ftello(f);
    fclose(f);
    return n;
}

/* Parses and validates against the layer's size; exits 2 on anything malformed. */
static void parse_blob(const char *path, int64_t layer_size, blob *b) {
    long size;
    int32_t i, first;
    b->data = read_all(path, &size);
    b->blob_size = size;
    if (size < BLOB_HEADER) die(2, "%s: blob of %ld bytes is shorter than its 12-byte header", path, size);
    b->count = (int32_t)(uint32_t)(b->data[0] | b->data[1] << 8 | b->data[2] << 16 | (uint32_t)b->data[3] << 24);
    b->span_size = (int64_t)le64(b->data + 4);
    if (b->count < 0) die(2, "%s: negative checkpoint count %" PRId32, path, b->count);
    if ((int64_t)size == BLOB_HEADER + (int64_t)b->count * CP_SIZE) {
        b->v1 = 0;
    } else if (b->count >= 1 && (int64_t)size == BLOB_HEADER + (int64_t)(b->count - 1) * CP_SIZE) {
        b->v1 = 1;
    } else {
        die(2, "%s: size %ld matches neither v2 (12 + %" PRId32 "*32785 = %" PRId64 ") nor v1 (%" PRId64 ")", path, size,
            b->count, (int64_t)BLOB_HEADER + (int64_t)b->count * CP_SIZE,
            (int64_t)BLOB_HEADER + (int64_t)(b->count > 0 ? b->count - 1 : 0) * CP_SIZE);
    }
    if (b->span_size <= 0) die(2, "%s: span_size %" PRId64 " is not positive", path, b->span_size);
    b->cps = calloc(b->count > 0 ? (size_t)b->count : 1, sizeof(checkpoint));
    if (b->cps == NULL) die(1, "out of memory");
    first = 0;
    if (b->v1) { /* v1 omits checkpoint 0: in = 10, out = 0, bits = 0, empty window */
        b->cps[0].in = 10;
        b->cps[0].out = 0;
        b->cps[0].bits = 0;
        b->cps[0].window = NULL;
        first = 1;
    }
    for (i = first; i < b->count; i++) {
        const uint8_t *p = b->data + BLOB_HEADER + (size_t)(i - first) * CP_SIZE;
        b->cps[i].in = (int64_t)le64(p);
        b->cps[i].out = (int64_t)le64(p + 8);
        b->cps[i].bits = p[16];
        b->cps[i].window = p + 17;
    }
    for (i = 0; i < b->count; i++) {
        const checkpoint *c = &b->cps[i];
        if (c->bits > 7) die(2, "%s: checkpoint %" PRId32 ": bits %d > 7", path, i, c->bits);
        if (c->in < 0 || c->out < 0) die(2, "%s: checkpoint %" PRId32 ": negative offset", path, i);
        if (c->bits > 0 && c->in < 1) die(2, "%s: checkpoint %" PRId32 ": bits > 0 at in = 0", path, i);
        if (c->in > layer_size)
            die(2, "%s: checkpoint %" PRId32 ": in %" PRId64 " beyond the layer's %" PRId64 " bytes", path, i, c->in,
                layer_size);
        if (i > 0 && c->out < b->cps[i - 1].out)
            die(2, "%s: checkpoint %" PRId32 ": out %" PRId64 " < previous %" PRId64, path, i, c->out, b->cps[i - 1].out);
        if (i > 0 && c->in < b->cps[i - 1].in)
            die(2, "%s: checkpoint %" PRId32 ": in %" PRId64 " < previous %" PRId64, path, i, c->in, b->cps[i - 1].in);
    }
}

/* ---- extraction from one checkpoint ---- */

static uint8_t zeros[WIN];

/* Inflates up to `len` bytes from checkpoint `c`; returns 0 or sets `err`. */
static int inflate_from(FILE *f, const checkpoint *c, int64_t len, sha256_ctx *sh, int64_t *produced, char *err,
                        size_t errlen) {
    static uint8_t in[CHUNK], out[CHUNK];
    z_stream s;
    int ret, raw = 1, at_member_end = 0, rc = 0;
    int64_t skip = 0; /* trailer bytes still to skip after the raw member ends */

    memset(&s, 0, sizeof s);
    if (inflateInit2(&s, -15) != Z_OK) {
        snprintf(err, errlen, "inflateInit2 failed");
        return -1;
    }
    if (fseeko(f, c->bits > 0 ? c->in - 1 : c->in, SEEK_SET) != 0) {
        snprintf(err, errlen, "seek: %s", strerror(errno));
        rc = -1;
        goto done;
    }
    if (c->bits > 0) {
        int byte = getc(f);
        if (byte == EOF) {
            snprintf(err, errlen, "no byte at in-1");
            rc = -1;
            goto done;
        }
        /* The block starts in the top `bits` bits of the byte before `in`. */
        if (inflatePrime(&s, c->bits, byte >> (8 - c->bits)) != Z_OK) {
            snprintf(err, errlen, "inflatePrime failed");
            rc = -1;
            goto done;
        }
    }
    if (inflateSetDictionary(&s, c->window != NULL ? c->window : zeros, WIN) != Z_OK) {
        snprintf(err, errlen, "inflateSetDictionary failed");
        rc = -1;
        goto done;
    }
    *produced = 0;
    while (*produced < len) {
        if (s.avail_in == 0) {
            size_t n = fread(in, 1, CHUNK, f);
            if (n == 0) {
                if (at_member_end && skip == 0) break; /* clean end of the last member */
                snprintf(err, errlen, skip > 0 ? "truncated gzip trailer" : "unexpected end of input");
                rc = -1;
                goto done;
            }
            s.next_in = in;
            s.avail_in = (uInt)n;
        }
        if (skip > 0) {
            uInt take = s.avail_in < skip ? s.avail_in : (uInt)skip;
            s.next_in += take;
            s.avail_in -= take;
            skip -= take;
            continue;
        }
        if (at_member_end) {
            /* More input after a member: the next member, with its own gzip header. */
            if (inflateReset2(&s, 47) != Z_OK) {
                snprintf(err, errlen, "inflateReset2 failed");
                rc = -1;
                goto done;
            }
            at_member_end = 0;
            raw = 0;
        }
        {
            int64_t want = len - *produced;
            uInt have;
            s.next_out = out;
            s.avail_out = want < CHUNK ? (uInt)want : CHUNK;
            have = s.avail_out;
            ret = inflate(&s, Z_NO_FLUSH);
            have -= s.avail_out;
            sha256_update(sh, out, have);
            *produced += have;
            if (ret == Z_STREAM_END) {
                at_member_end = 1;
                if (raw) skip = 8; /* a raw inflater leaves the CRC32 + ISIZE trailer to us */
            } else if (ret == Z_BUF_ERROR) {
                if (s.avail_in != 0 && have == 0) {
                    snprintf(err, errlen, "inflate made no progress");
                    rc = -1;
                    goto done;
                }
            } else if (ret != Z_OK) {
                snprintf(err, errlen, "inflate: %s (%d)", s.msg != NULL ? s.msg : "error", ret);
                rc = -1;
                goto done;
            }
        }
    }
done:
    inflateEnd(&s);
    return rc;
}

static int cmd_check(const char *blob_path, const char *layer_path, int64_t len) {
    blob b;
    FILE *f;
    int32_t k;
    int failures = 0;
    parse_blob(blob_path, file_size(layer_path), &b);
    f = fopen(layer_path, "rb");
    if (f == NULL) die(1, "%s: %s", layer_path, strerror(errno));
    printf("# layout=%s count=%" PRId32 " span_size=%" PRId64 " blob_size=%ld\n", b.v1 ? "v1" : "v2", b.count,
           b.span_size, b.blob_size);
    for (k = 0; k < b.count; k++) {
        const checkpoint *c = &b.cps[k];
        sha256_ctx sh, wh;
        char hex[65], whex[65], err[256];
        int64_t produced = 0;
        sha256_init(&wh);
        sha256_update(&wh, c->window != NULL ? c->window : zeros, WIN);
        sha256_hex(&wh, whex);
        sha256_init(&sh);
        err[0] = 0;
        if (inflate_from(f, c, len, &sh, &produced, err, sizeof err) != 0) {
            printf("%" PRId32 " %" PRId64 " %" PRId64 " %d ERROR %" PRId64 " %s\n", k, c->in, c->out, c->bits, produced, err);
            failures++;
        } else {
            sha256_hex(&sh, hex);
            printf("%" PRId32 " %" PRId64 " %" PRId64 " %d %s %" PRId64 " %s\n", k, c->in, c->out, c->bits, hex, produced,
                   whex);
        }
    }
    fclose(f);
    return failures > 0 ? 3 : 0;
}

static int cmd_spans(const char *blob_path, const char *layer_path) {
    blob b;
    int64_t size = file_size(layer_path);
    int32_t i;
    parse_blob(blob_path, size, &b);
    for (i = 0; i < b.count; i++) {
        int64_t start = b.cps[i].in - (b.cps[i].bits > 0 ? 1 : 0);
        int64_t end = i + 1 < b.count ? b.cps[i + 1].in : size;
        printf("%" PRId32 " %" PRId64 " %" PRId64 "\n", i, start, end);
    }
    return 0;
}

/* ---- building (§3's rule, zran-style) ---- */

typedef struct {
    int64_t in, out;
    int bits;
    uint8_t window[WIN];
} built_cp;

static int cmd_build(int64_t span, const char *layer_path, const char *out_path) {
    static uint8_t input[CHUNK], window[WIN];
    z_stream s;
    FILE *f, *o;
    int64_t totin = 0, totout = 0, last = 0;
    built_cp *cps = NULL;
    size_t have = 0, cap = 0, i;
    int ret = Z_OK, eof = 0;
    uint8_t hdr[BLOB_HEADER];

    if (span <= 0) die(1, "span must be positive");
    f = fopen(layer_path, "rb");
    if (f == NULL) die(1, "%s: %s", layer_path, strerror(errno));
    memset(&s, 0, sizeof s);
    memset(window, 0, WIN);
    if (inflateInit2(&s, 47) != Z_OK) die(1, "inflateInit2 failed");
    s.avail_out = 0;
    for (;;) {
        if (s.avail_in == 0 && !eof) {
            size_t n = fread(input, 1, CHUNK, f);
            if (n == 0) eof = 1;
            s.next_in = input;
            s.avail_in = (uInt)n;
        }
        if (s.avail_in == 0 && eof) die(1, "%s: unexpected end of input at byte %" PRId64, layer_path, totin);
        if (s.avail_out == 0) { /* the window doubles as the output buffer: a ring of 32 KiB */
            s.next_out = window;
            s.avail_out = WIN;
        }
        totin += s.avail_in;
        totout += s.avail_out;
        ret = inflate(&s, Z_BLOCK);
        totin -= s.avail_in;
        totout -= s.avail_out;
        if (ret == Z_NEED_DICT || ret == Z_DATA_ERROR || ret == Z_MEM_ERROR || ret == Z_STREAM_ERROR)
            die(1, "%s: inflate at byte %" PRId64 ": %s", layer_path, totin, s.msg != NULL ? s.msg : "error");
        if (ret == Z_STREAM_END) {
            /* Another member follows when any input is left. */
            if (s.avail_in == 0 && !eof) {
                size_t n = fread(input, 1, CHUNK, f);
                if (n == 0) eof = 1;
                s.next_in = input;
                s.avail_in = (uInt)n;
            }
            if (s.avail_in == 0) break;
            if (inflateReset2(&s, 47) != Z_OK) die(1, "inflateReset2 failed");
            continue;
        }
        if ((s.data_type & 128) && !(s.data_type & 64) && (totout == 0 || totout - last > span)) {
            unsigned left = s.avail_out;
            built_cp *c;
            if (have == cap) {
                cap = cap ? cap * 2 : 8;
                cps = realloc(cps, cap * sizeof *cps);
                if (cps == NULL) die(1, "out of memory");
            }
            c = &cps[have++];
            c->in = totin;
            c->out = totout;
            c->bits = s.data_type & 7;
            /* Oldest first: the ring's tail [WIN-left, WIN), then its head [0, WIN-left). */
            memcpy(c->window, window + WIN - left, left);
            memcpy(c->window + left, window, WIN - left);
            last = totout;
        }
    }
    inflateEnd(&s);
    fclose(f);

    o = fopen(out_path, "wb");
    if (o == NULL) die(1, "%s: %s", out_path, strerror(errno));
    hdr[0] = (uint8_t)have;
    hdr[1] = (uint8_t)(have >> 8);
    hdr[2] = (uint8_t)(have >> 16);
    hdr[3] = (uint8_t)(have >> 24);
    put_le64(hdr + 4, (uint64_t)span);
    fwrite(hdr, 1, BLOB_HEADER, o);
    for (i = 0; i < have; i++) {
        uint8_t head[17];
        put_le64(head, (uint64_t)cps[i].in);
        put_le64(head + 8, (uint64_t)cps[i].out);
        head[16] = (uint8_t)cps[i].bits;
        fwrite(head, 1, sizeof head, o);
        fwrite(cps[i].window, 1, WIN, o);
    }
    if (fclose(o) != 0) die(1, "%s: write failed", out_path);
    printf("# count=%zu span_size=%" PRId64 " uncompressed=%" PRId64 " compressed=%" PRId64 "\n", have, span, totout,
           totin);
    free(cps);
    return 0;
}

/* ---- gzip members ---- */

static int cmd_members(const char *layer_path) {
    static uint8_t input[CHUNK], out[CHUNK];
    z_stream s;
    FILE *f = fopen(layer_path, "rb");
    int64_t totin = 0, totout = 0, start = 0, ustart = 0, hdrlen = -1;
    int member = 0, eof = 0, ret;
    if (f == NULL) die(1, "%s: %s", layer_path, strerror(errno));
    memset(&s, 0, sizeof s);
    if (inflateInit2(&s, 31) != Z_OK) die(1, "inflateInit2 failed"); /* gzip only */
    for (;;) {
        if (s.avail_in == 0 && !eof) {
            size_t n = fread(input, 1, CHUNK, f);
            if (n == 0) eof = 1;
            s.next_in = input;
            s.avail_in = (uInt)n;
        }
        if (s.avail_in == 0 && eof) die(1, "%s: unexpected end of input in member %d", layer_path, member);
        s.next_out = out;
        s.avail_out = CHUNK;
        totin += s.avail_in;
        totout += s.avail_out;
        ret = inflate(&s, Z_BLOCK);
        totin -= s.avail_in;
        totout -= s.avail_out;
        if (ret != Z_OK && ret != Z_STREAM_END && ret != Z_BUF_ERROR)
            die(1, "%s: inflate at byte %" PRId64 ": %s", layer_path, totin, s.msg != NULL ? s.msg : "error");
        /* The first stop of a member is right after its header. */
        if (hdrlen < 0 && (s.data_type & 128)) hdrlen = totin - start;
        if (ret == Z_STREAM_END) {
            printf("%d %" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 "\n", member, start, totin, hdrlen, totout - ustart);
            if (s.avail_in == 0 && !eof) {
                size_t n = fread(input, 1, CHUNK, f);
                if (n == 0) eof = 1;
                s.next_in = input;
                s.avail_in = (uInt)n;
            }
            if (s.avail_in == 0) break;
            inflateReset2(&s, 31);
            member++;
            start = totin;
            ustart = totout;
            hdrlen = -1;
        }
    }
    inflateEnd(&s);
    fclose(f);
    return 0;
}

static int64_t parse_i64(const char *s, const char *what) {
    char *end;
    long long v;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *s == 0 || *end != 0 || v < 0) die(1, "bad %s: %s", what, s);
    return (int64_t)v;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--spans") == 0) return cmd_spans(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "--build") == 0) return cmd_build(parse_i64(argv[2], "span"), argv[3], argv[4]);
    if (argc == 3 && strcmp(argv[1], "--members") == 0) return cmd_members(argv[2]);
    if ((argc == 3 || argc == 4) && argv[1][0] != '-')
        return cmd_check(argv[1], argv[2], argc == 4 ? parse_i64(argv[3], "LEN") : 65536);
    fprintf(stderr,
            "usage: ckpt-oracle BLOB LAYER.gz [LEN]\n"
            "       ckpt-oracle --spans BLOB LAYER.gz\n"
            "       ckpt-oracle --build SPAN LAYER.gz OUT_BLOB\n"
            "       ckpt-oracle --members LAYER.gz\n");
    return 1;
}
