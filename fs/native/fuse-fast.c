/*
 * fuse-native's binding, built from its own fuse-native.c, plus a native read path.
 *
 * Why: fuse-native answers every read in JavaScript. A read of bytes that are already inflated
 * in memory then costs three thread wake-ups (libfuse worker → event loop → worker) and the event
 * loop's time, which caps a warm sequential read near 1 GB/s on this machine (fs/README.md).
 * Here the libfuse worker thread answers such a read itself: JavaScript registers, per mount,
 * every file of the tree (path → tar offset and size) and the inflated spans held in the
 * memory cache; a read whose bytes are all in registered spans is copied in the worker and
 * never reaches JavaScript. Anything else (a span not in memory,
 * a read that ends in a span whose successor is not in memory, so that JavaScript sees the
 * reads that drive its read-ahead) goes to JavaScript exactly as before.
 *
 * getattr likewise: JavaScript registers every path of the (immutable) tree with its stat at
 * mount, and a worker answers getattr, and so the kernel's lookups (libfuse answers a lookup by
 * getattr), from that table; a path not in it goes to JavaScript.
 *
 * fuse-native.c is included unchanged; only fuse_new is wrapped, to put our read and getattr
 * ops in front of fuse-native's. Locking: one writer-preferring rwlock over every table. Workers hold it shared
 * for one lookup and copy (≤ 128 KiB); JavaScript takes it exclusively to change a table, which
 * is never more than a short wait (never I/O) on the event loop.
 */
#define FUSE_USE_VERSION 29
#include <fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

static struct fuse *soci_fuse_new(struct fuse_chan *ch, struct fuse_args *args, const struct fuse_operations *op,
                                  size_t op_size, void *user_data);
#define fuse_new soci_fuse_new
/*
 * Thread locals reused: fuse-native makes each libfuse worker's locals (a JS buffer and a
 * uv_async_t on the event loop) on the worker's first request and never frees them (its
 * thread-local key has no destructor), while libfuse 2 ends idle workers beyond 10 and starts
 * new ones under load. Here the key gets a destructor that keeps an ended worker's locals on a
 * free list, and a new worker of the same mount takes them instead of asking for new ones.
 */
static int soci_key_create(pthread_key_t *key, void (*destructor)(void *));
static void *soci_getspecific(pthread_key_t key);
#define pthread_key_create soci_key_create
#define pthread_getspecific soci_getspecific
/* fuse-native's NAPI_INIT registers its module; ours (at the end) registers both instead. */
#include <node_api.h>
#undef NAPI_MODULE
#define NAPI_MODULE(modname, regfunc)
#include FUSE_NATIVE_C
#undef fuse_new
#undef pthread_key_create
#undef pthread_getspecific

typedef struct soci_free_locals {
  fuse_thread_locals_t *l;
  struct soci_free_locals *next;
} soci_free_locals_t;

static pthread_mutex_t soci_free_lock = PTHREAD_MUTEX_INITIALIZER;
static soci_free_locals_t *soci_free_list = NULL;
static uint64_t soci_locals_reused = 0;

/* A worker ended: its locals are idle (its last request was answered before it could end). */
static void soci_locals_release(void *data) {
  soci_free_locals_t *n = malloc(sizeof(*n));
  if (n == NULL) return; /* leaked, as fuse-native would */
  n->l = (fuse_thread_locals_t *) data;
  pthread_mutex_lock(&soci_free_lock);
  n->next = soci_free_list;
  soci_free_list = n;
  pthread_mutex_unlock(&soci_free_lock);
}

static int soci_key_create(pthread_key_t *key, void (*destructor)(void *)) {
  return pthread_key_create(key, soci_locals_release);
}

static void *soci_getspecific(pthread_key_t key) {
  void *data = pthread_getspecific(key);
  if (data != NULL) return data;
  void *ft = fuse_get_context()->private_data;
  fuse_thread_locals_t *l = NULL;
  pthread_mutex_lock(&soci_free_lock);
  for (soci_free_locals_t **p = &soci_free_list; *p != NULL; p = &(*p)->next) {
    if ((void *) (*p)->l->fuse == ft) {
      soci_free_locals_t *n = *p;
      *p = n->next;
      l = n->l;
      free(n);
      soci_locals_reused++;
      break;
    }
  }
  pthread_mutex_unlock(&soci_free_lock);
  if (l != NULL) pthread_setspecific(key, l);
  return l; /* NULL: fuse-native makes new locals */
}

/* The mount is going: its ended workers' locals leave the list (they stay allocated, as fuse-native's always did). */
static void soci_forget_locals(void *ft) {
  pthread_mutex_lock(&soci_free_lock);
  for (soci_free_locals_t **p = &soci_free_list; *p != NULL;) {
    if ((void *) (*p)->l->fuse == ft) {
      soci_free_locals_t *n = *p;
      *p = n->next;
      free(n);
    } else {
      p = &(*p)->next;
    }
  }
  pthread_mutex_unlock(&soci_free_lock);
}

// ---------------------------------------------------------------------------------------------

typedef struct {
  char *path; /* NULL: empty slot */
  uint32_t path_len;
  uint64_t hash;
  uint64_t data_offset;
  uint64_t size;
  uint8_t has_data; /* a regular file whose extent is known: reads may be answered */
  uint32_t attr;    /* 1 + index into attr_ints of its stat, or 0: getattr goes to JavaScript */
} soci_file_t;

/* fuse-native's stat layout (populate_stat): 18 uint32 per entry. */
#define SOCI_STAT_INTS 18

typedef struct {
  int used;
  void *ft; /* fuse-native's fuse_thread_t of the mount: fuse_get_context()->private_data */
  uint32_t span_count;
  uint64_t *span_start; /* uncompressed tar offsets */
  uint64_t *span_end;
  const uint8_t **span_data; /* NULL: not in memory */
  napi_ref *span_ref;        /* keeps span_data's buffer alive while registered */
  uint8_t *span_hit;         /* read natively since the last soci_fast_hits */
  soci_file_t *files;
  uint32_t file_cap; /* power of two */
  uint32_t file_count;
  uint32_t *attr_ints;
  uint64_t reads; /* answered natively */
  uint64_t bytes;
  uint64_t attrs; /* getattrs answered natively */
} soci_table_t;

#define SOCI_MAX_TABLES 4096
static soci_table_t soci_tables[SOCI_MAX_TABLES];
static uint32_t soci_table_high = 0; /* slots [0, high) may be used */
static pthread_rwlock_t soci_lock;
static int (*soci_js_read)(const char *, char *, size_t, off_t, struct fuse_file_info *) = NULL;
static int (*soci_js_getattr)(const char *, struct stat *) = NULL;

static uint64_t soci_hash(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ULL; /* FNV-1a */
  for (size_t i = 0; i < n; i++) {
    h ^= (uint8_t) s[i];
    h *= 1099511628211ULL;
  }
  return h;
}

static soci_file_t *soci_find_file(soci_table_t *t, const char *path, size_t n, uint64_t h) {
  if (t->file_cap == 0) return NULL;
  uint32_t mask = t->file_cap - 1;
  for (uint32_t i = (uint32_t) h & mask;; i = (i + 1) & mask) {
    soci_file_t *f = &t->files[i];
    if (f->path == NULL) return NULL;
    if (f->hash == h && f->path_len == n && memcmp(f->path, path, n) == 0) return f;
  }
}

/* The span holding tar offset `off` (off < span_end[last]). */
static uint32_t soci_span_for(soci_table_t *t, uint64_t off) {
  uint32_t lo = 0, hi = t->span_count - 1;
  while (lo < hi) {
    uint32_t mid = lo + (hi - lo + 1) / 2;
    if (t->span_start[mid] <= off) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* The mount's table (shared lock held), or NULL. */
static soci_table_t *soci_table_of(void *ft) {
  for (uint32_t i = 0; i < soci_table_high; i++) if (soci_tables[i].used && soci_tables[i].ft == ft) return &soci_tables[i];
  return NULL;
}

/* Answers the read into buf and returns its result, or returns INT32_MIN: not answerable here. */
static int soci_try_read(void *ft, const char *path, char *buf, size_t len, off_t offset) {
  if (offset < 0) return INT32_MIN;
  size_t n = strlen(path);
  uint64_t h = soci_hash(path, n);
  int res = INT32_MIN;
  pthread_rwlock_rdlock(&soci_lock);
  soci_table_t *t = soci_table_of(ft);
  soci_file_t *f = t == NULL ? NULL : soci_find_file(t, path, n, h);
  if (f == NULL || !f->has_data || t->span_count == 0) goto out;
  if ((uint64_t) offset >= f->size || len == 0) {
    res = 0;
    __atomic_add_fetch(&t->reads, 1, __ATOMIC_RELAXED);
    goto out;
  }
  uint64_t want = f->size - (uint64_t) offset;
  if (want > len) want = len;
  uint64_t a = f->data_offset + (uint64_t) offset, b = a + want;
  if (b > t->span_end[t->span_count - 1]) goto out;
  uint32_t first = soci_span_for(t, a), last = soci_span_for(t, b - 1);
  for (uint32_t id = first; id <= last; id++) if (t->span_data[id] == NULL) goto out;
  /* JavaScript's read-ahead is driven by the reads it sees: leave it the reads of the last span in memory. */
  if (last + 1 < t->span_count && t->span_data[last + 1] == NULL) goto out;
  uint64_t pos = 0;
  for (uint32_t id = first; id <= last; id++) {
    uint64_t from = a > t->span_start[id] ? a : t->span_start[id];
    uint64_t to = b < t->span_end[id] ? b : t->span_end[id];
    memcpy(buf + pos, t->span_data[id] + (from - t->span_start[id]), to - from);
    pos += to - from;
    t->span_hit[id] = 1; /* a benign race: a flag, read under the exclusive lock */
  }
  __atomic_add_fetch(&t->reads, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&t->bytes, pos, __ATOMIC_RELAXED);
  res = (int) pos;
out:
  pthread_rwlock_unlock(&soci_lock);
  return res;
}

static int soci_getattr(const char *path, struct stat *st) {
  size_t n = strlen(path);
  uint64_t h = soci_hash(path, n);
  int found = 0;
  pthread_rwlock_rdlock(&soci_lock);
  soci_table_t *t = soci_table_of(fuse_get_context()->private_data);
  soci_file_t *f = t == NULL ? NULL : soci_find_file(t, path, n, h);
  if (f != NULL && f->attr != 0) {
    memset(st, 0, sizeof(*st));
    populate_stat(t->attr_ints + (size_t) (f->attr - 1) * SOCI_STAT_INTS, st);
    __atomic_add_fetch(&t->attrs, 1, __ATOMIC_RELAXED);
    found = 1;
  }
  pthread_rwlock_unlock(&soci_lock);
  return found ? 0 : soci_js_getattr(path, st);
}

static int soci_read(const char *path, char *buf, size_t len, off_t offset, struct fuse_file_info *info) {
  int res = soci_try_read(fuse_get_context()->private_data, path, buf, len, offset);
  if (res != INT32_MIN) return res;
  return soci_js_read(path, buf, len, offset, info);
}

static struct fuse *soci_fuse_new(struct fuse_chan *ch, struct fuse_args *args, const struct fuse_operations *op,
                                  size_t op_size, void *user_data) {
  struct fuse_operations ours = *op;
  if (op->read != NULL) {
    soci_js_read = op->read; /* the same function for every mount */
    ours.read = soci_read;
  }
  if (op->getattr != NULL) {
    soci_js_getattr = op->getattr;
    ours.getattr = soci_getattr;
  }
  return fuse_new(ch, args, &ours, op_size, user_data);
}

// ---------------------------------------------------------------------------------------------
// JavaScript API (all called on the event loop thread)

static soci_table_t *soci_table_arg(napi_env env, napi_value v) {
  uint32_t id;
  if (napi_get_value_uint32(env, v, &id) != napi_ok || id >= soci_table_high || !soci_tables[id].used) {
    napi_throw_error(env, NULL, "fast read: no such table");
    return NULL;
  }
  return &soci_tables[id];
}

/* A typed array argument of the given type, at least `min` elements: its data, or NULL (thrown). */
static void *soci_typed_arg(napi_env env, napi_value v, napi_typedarray_type want, size_t min, size_t *count, const char *what) {
  napi_typedarray_type type;
  void *data;
  if (napi_get_typedarray_info(env, v, &type, count, &data, NULL, NULL) != napi_ok || type != want || *count < min) {
    napi_throw_error(env, NULL, what);
    return NULL;
  }
  return data;
}

static void soci_table_free(napi_env env, soci_table_t *t) {
  for (uint32_t i = 0; i < t->span_count; i++) if (t->span_ref[i] != NULL) napi_delete_reference(env, t->span_ref[i]);
  for (uint32_t i = 0; i < t->file_cap; i++) free(t->files[i].path);
  free(t->span_start);
  free(t->span_end);
  free(t->span_data);
  free(t->span_ref);
  free(t->span_hit);
  free(t->files);
  free(t->attr_ints);
  memset(t, 0, sizeof(*t));
}

/* attach(thread: Buffer, spans: Float64Array [start0, end0, start1, end1, ...]) → table id */
NAPI_METHOD(soci_fast_attach) {
  NAPI_ARGV(2)
  void *ft;
  size_t ft_len;
  if (napi_get_buffer_info(env, argv[0], &ft, &ft_len) != napi_ok || ft_len < sizeof(fuse_thread_t)) {
    napi_throw_error(env, NULL, "fast read: not a fuse-native thread buffer");
    return NULL;
  }
  static const char *const bad_spans = "fast read: spans must be a Float64Array of start, end pairs";
  size_t count;
  const double *pairs = soci_typed_arg(env, argv[1], napi_float64_array, 0, &count, bad_spans);
  if (pairs == NULL) return NULL;
  if (count % 2 != 0 || count / 2 > UINT32_MAX) {
    napi_throw_error(env, NULL, bad_spans);
    return NULL;
  }
  uint32_t spans = (uint32_t) (count / 2);
  for (uint32_t i = 0; i < spans; i++) {
    if (!(pairs[2 * i] >= 0 && pairs[2 * i + 1] >= pairs[2 * i] && (i == 0 || pairs[2 * i] == pairs[2 * i - 1]))) {
      napi_throw_error(env, NULL, "fast read: spans must be contiguous and ascending");
      return NULL;
    }
  }
  pthread_rwlock_wrlock(&soci_lock);
  uint32_t id = 0;
  while (id < SOCI_MAX_TABLES && soci_tables[id].used) id++;
  if (id == SOCI_MAX_TABLES) {
    pthread_rwlock_unlock(&soci_lock);
    napi_throw_error(env, NULL, "fast read: too many mounts");
    return NULL;
  }
  soci_table_t *t = &soci_tables[id];
  t->span_count = spans;
  t->span_start = calloc(spans + 1, sizeof(uint64_t));
  t->span_end = calloc(spans + 1, sizeof(uint64_t));
  t->span_data = calloc(spans + 1, sizeof(uint8_t *));
  t->span_ref = calloc(spans + 1, sizeof(napi_ref));
  t->span_hit = calloc(spans + 1, 1);
  t->file_cap = 1024;
  t->files = calloc(t->file_cap, sizeof(soci_file_t));
  if (!t->span_start || !t->span_end || !t->span_data || !t->span_ref || !t->span_hit || !t->files) {
    soci_table_free(env, t);
    pthread_rwlock_unlock(&soci_lock);
    napi_throw_error(env, NULL, "fast read: out of memory");
    return NULL;
  }
  for (uint32_t i = 0; i < spans; i++) {
    t->span_start[i] = (uint64_t) pairs[2 * i];
    t->span_end[i] = (uint64_t) pairs[2 * i + 1];
  }
  t->ft = ft;
  t->used = 1;
  if (id >= soci_table_high) soci_table_high = id + 1;
  pthread_rwlock_unlock(&soci_lock);
  NAPI_RETURN_UINT32(id)
}

NAPI_METHOD(soci_fast_detach) {
  NAPI_ARGV(1)
  soci_table_t *t = soci_table_arg(env, argv[0]);
  if (t == NULL) return NULL;
  soci_forget_locals(t->ft);
  pthread_rwlock_wrlock(&soci_lock);
  soci_table_free(env, t);
  while (soci_table_high > 0 && !soci_tables[soci_table_high - 1].used) soci_table_high--;
  pthread_rwlock_unlock(&soci_lock);
  return NULL;
}

/* The entry for path (taking ownership of it), made if new; NULL when out of memory. Exclusive lock held. */
static soci_file_t *soci_insert(soci_table_t *t, char *path, size_t n, uint64_t h) {
  soci_file_t *f = soci_find_file(t, path, n, h);
  if (f != NULL) {
    free(path);
    return f;
  }
  if ((t->file_count + 1) * 2 > t->file_cap) {
    uint32_t cap = t->file_cap * 2;
    soci_file_t *files = calloc(cap, sizeof(soci_file_t));
    if (files == NULL) {
      free(path);
      return NULL; /* the path just stays with JavaScript */
    }
    for (uint32_t i = 0; i < t->file_cap; i++) {
      if (t->files[i].path == NULL) continue;
      uint32_t j = (uint32_t) t->files[i].hash & (cap - 1);
      while (files[j].path != NULL) j = (j + 1) & (cap - 1);
      files[j] = t->files[i];
    }
    free(t->files);
    t->files = files;
    t->file_cap = cap;
  }
  uint32_t j = (uint32_t) h & (t->file_cap - 1);
  while (t->files[j].path != NULL) j = (j + 1) & (t->file_cap - 1);
  f = &t->files[j];
  f->path = path;
  f->path_len = (uint32_t) n;
  f->hash = h;
  t->file_count++;
  return f;
}

/*
 * tree(table, paths: string (each path ends with a NUL), stats: Uint32Array(18 per path),
 * extents: Float64Array(2 per path: tar offset and size of a regular file's data, or -1, -1)):
 * every path of the mount with its stat, so that getattr (and lookup, which libfuse answers by
 * getattr) and the reads of regular files are answered without JavaScript.
 */
NAPI_METHOD(soci_fast_tree) {
  NAPI_ARGV(4)
  soci_table_t *t = soci_table_arg(env, argv[0]);
  if (t == NULL) return NULL;
  size_t len;
  if (napi_get_value_string_utf8(env, argv[1], NULL, 0, &len) != napi_ok) {
    napi_throw_error(env, NULL, "fast read: paths must be a string");
    return NULL;
  }
  static const char *const bad_tree = "fast read: tree needs a Uint32Array of stats and a Float64Array of extents, per path";
  size_t count, ecount;
  const uint32_t *data = soci_typed_arg(env, argv[2], napi_uint32_array, 0, &count, bad_tree);
  if (data == NULL) return NULL;
  const double *ext = soci_typed_arg(env, argv[3], napi_float64_array, 0, &ecount, bad_tree);
  if (ext == NULL) return NULL;
  if (count % SOCI_STAT_INTS != 0 || ecount != 2 * (count / SOCI_STAT_INTS)) {
    napi_throw_error(env, NULL, bad_tree);
    return NULL;
  }
  size_t entries = count / SOCI_STAT_INTS;
  char *all = malloc(len + 1);
  uint32_t *ints = malloc(count * sizeof(uint32_t) + 1);
  if (all == NULL || ints == NULL) {
    free(all);
    free(ints);
    napi_throw_error(env, NULL, "fast read: out of memory");
    return NULL;
  }
  napi_get_value_string_utf8(env, argv[1], all, len + 1, &len);
  memcpy(ints, data, count * sizeof(uint32_t));
  pthread_rwlock_wrlock(&soci_lock);
  free(t->attr_ints);
  t->attr_ints = ints;
  size_t pos = 0;
  for (size_t i = 0; i < entries && pos < len; i++) {
    size_t n = strnlen(all + pos, len - pos);
    char *path = malloc(n + 1);
    if (path == NULL) break;
    memcpy(path, all + pos, n);
    path[n] = 0;
    soci_file_t *f = soci_insert(t, path, n, soci_hash(path, n));
    pos += n + 1;
    if (f == NULL) break;
    f->attr = (uint32_t) i + 1;
    if (ext[2 * i] >= 0 && ext[2 * i + 1] >= 0) {
      f->data_offset = (uint64_t) ext[2 * i];
      f->size = (uint64_t) ext[2 * i + 1];
      f->has_data = 1;
    }
  }
  pthread_rwlock_unlock(&soci_lock);
  free(all);
  return NULL;
}

/* span(table, id, buffer | null): the span's inflated bytes are (no longer) in memory */
NAPI_METHOD(soci_fast_span) {
  NAPI_ARGV(3)
  soci_table_t *t = soci_table_arg(env, argv[0]);
  if (t == NULL) return NULL;
  uint32_t id;
  if (napi_get_value_uint32(env, argv[1], &id) != napi_ok || id >= t->span_count) {
    napi_throw_error(env, NULL, "fast read: no such span");
    return NULL;
  }
  napi_valuetype kind;
  napi_typeof(env, argv[2], &kind);
  const uint8_t *data = NULL;
  napi_ref ref = NULL;
  if (kind != napi_null && kind != napi_undefined) {
    void *p;
    size_t len;
    if (napi_get_buffer_info(env, argv[2], &p, &len) != napi_ok) {
      napi_throw_error(env, NULL, "fast read: span data must be a Buffer");
      return NULL;
    }
    /* A buffer shorter than its span is never registered: the span stays with JavaScript. */
    if (len >= t->span_end[id] - t->span_start[id]) {
      data = (const uint8_t *) p;
      napi_create_reference(env, argv[2], 1, &ref);
    }
  }
  pthread_rwlock_wrlock(&soci_lock);
  napi_ref old = t->span_ref[id];
  t->span_data[id] = data;
  t->span_ref[id] = ref;
  t->span_hit[id] = 0;
  pthread_rwlock_unlock(&soci_lock);
  if (old != NULL) napi_delete_reference(env, old);
  NAPI_RETURN_UINT32(data != NULL ? 1 : 0)
}

/* hits(table, out: Uint32Array) → how many span ids were written: spans read natively since the last call */
NAPI_METHOD(soci_fast_hits) {
  NAPI_ARGV(2)
  soci_table_t *t = soci_table_arg(env, argv[0]);
  if (t == NULL) return NULL;
  size_t cap;
  uint32_t *out = soci_typed_arg(env, argv[1], napi_uint32_array, 0, &cap, "fast read: hits needs a Uint32Array");
  if (out == NULL) return NULL;
  uint32_t n = 0;
  pthread_rwlock_wrlock(&soci_lock);
  for (uint32_t i = 0; i < t->span_count && n < cap; i++) {
    if (t->span_hit[i]) {
      t->span_hit[i] = 0;
      out[n++] = i;
    }
  }
  pthread_rwlock_unlock(&soci_lock);
  NAPI_RETURN_UINT32(n)
}

/* stats(table, out: Float64Array(3)): [reads, bytes, getattrs] answered natively */
NAPI_METHOD(soci_fast_stats) {
  NAPI_ARGV(2)
  soci_table_t *t = soci_table_arg(env, argv[0]);
  if (t == NULL) return NULL;
  size_t cap;
  double *out = soci_typed_arg(env, argv[1], napi_float64_array, 3, &cap, "fast read: stats needs a Float64Array(3)");
  if (out == NULL) return NULL;
  out[0] = (double) __atomic_load_n(&t->reads, __ATOMIC_RELAXED);
  out[1] = (double) __atomic_load_n(&t->bytes, __ATOMIC_RELAXED);
  out[2] = (double) __atomic_load_n(&t->attrs, __ATOMIC_RELAXED);
  return NULL;
}

/* locals_reused() → how many times an ended worker's locals were taken by a new worker */
NAPI_METHOD(soci_locals_reused_count) {
  pthread_mutex_lock(&soci_free_lock);
  double n = (double) soci_locals_reused;
  pthread_mutex_unlock(&soci_free_lock);
  napi_value v;
  napi_create_double(env, n, &v);
  return v;
}

static void soci_export(napi_env env, napi_value exports) {
  NAPI_EXPORT_FUNCTION(soci_locals_reused_count)
  NAPI_EXPORT_FUNCTION(soci_fast_attach)
  NAPI_EXPORT_FUNCTION(soci_fast_detach)
  NAPI_EXPORT_FUNCTION(soci_fast_tree)
  NAPI_EXPORT_FUNCTION(soci_fast_span)
  NAPI_EXPORT_FUNCTION(soci_fast_hits)
  NAPI_EXPORT_FUNCTION(soci_fast_stats)
}

/* fuse-native's module init, then ours on the same exports object. */
NAPI_MODULE_INIT() {
  static int once = 0;
  if (!once) {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* Workers hold the lock back to back; the event loop must not starve waiting for it. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&soci_lock, &attr);
    once = 1;
  }
  exports = napi_macros_init_wrap(env, exports);
  soci_export(env, exports);
  return exports;
}
