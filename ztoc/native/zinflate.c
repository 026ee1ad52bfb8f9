/*
 * zinflate: a thin N-API binding over the system zlib's raw inflate API.
 *
 * Node's own zlib binding cannot stop at deflate block boundaries (Z_BLOCK),
 * report data_type, inflatePrime or seed a raw window, which is what building
 * and resuming from zTOC checkpoints needs; pako can, but is several times
 * slower. This addon exposes exactly those calls, one z_stream per handle.
 *
 * Calling convention (all functions are plain functions on the module):
 *   create(windowBits)                                  -> handle
 *   inflate(handle, input, inStart, inEnd,
 *           output, outStart, outEnd, flush, result)    -> undefined
 *       result: caller-owned Int32Array(>=4), receives
 *       [status, consumed, produced, data_type] (no allocation per call)
 *   inflateAsync(handle, input, inStart, inEnd, output, outStart, outEnd,
 *                flush, result, callback)               -> undefined
 *       the same on one of the addon's threads; callback(null) once result is filled
 *   reset(handle, windowBits)                           -> zlib status
 *   prime(handle, bits, value)                          -> zlib status
 *   setDictionary(handle, dictionary)                   -> zlib status
 *   end(handle)                                         -> undefined (idempotent)
 *   zlibVersion                                         -> string property
 *
 * Misuse (wrong types, ranges outside the buffers, a closed handle) throws a
 * JS TypeError/RangeError/Error; nothing here may abort the process.
 *
 * Which zlib runs: node-gyp puts <nodedir>/include/node first on the include
 * path, and official Node builds ship their bundled zlib's headers there and
 * export its symbols from the node binary, which the dynamic linker prefers
 * over the libz.so.1 we also link. So under such a Node this runs Node's own
 * zlib (Chromium's fork, ~1.5x faster than Debian's 1.2.13 at inflate) with
 * matching headers; under a Node built with --shared-zlib it runs libz.so.1.
 * `zlibVersion` tells which. Both behave identically for everything used
 * here (test/ztoc/inflate.test.ts compares block stops against pako).
 */
#define NAPI_VERSION 8
#include <node_api.h>
#include <zlib.h>

#include <limits.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rough native footprint of one inflater (state ~7 KiB + 32 KiB window),
 * reported to V8 so that GC notices handles that were never end()ed. */
#define INFLATER_EXTERNAL_BYTES (40 * 1024)

typedef struct {
  z_stream strm;
  int live; /* inflateInit2 succeeded and inflateEnd not yet called */
  int busy; /* an inflateAsync job owns strm: every other call throws, end() is deferred */
  int end_pending; /* end() came while busy: the job's completion ends the stream */
} zinflater;

/* Tags handles so that foreign objects are rejected instead of unwrapped. */
static const napi_type_tag ZINFLATER_TAG = {0x5a1c7e3b9d2f4a61ULL, 0x8b0e6c4d2a19f357ULL};

/* Stands in for the NULL data pointer of empty or detached arrays: zlib
 * reports Z_STREAM_ERROR for next_out == NULL even when avail_out is 0. */
static unsigned char empty_byte;

#define CHECK_NAPI(env, call)                                         \
  do {                                                                \
    if ((call) != napi_ok) {                                          \
      throw_last_error((env), #call);                                 \
      return NULL;                                                    \
    }                                                                 \
  } while (0)

static void throw_last_error(napi_env env, const char *what) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;
  const napi_extended_error_info *info = NULL;
  napi_get_last_error_info(env, &info);
  const char *msg = (info && info->error_message) ? info->error_message : what;
  napi_throw_error(env, "ERR_ZINFLATE_NAPI", msg);
}

static void zinflater_release(zinflater *z) {
  if (z->live) {
    inflateEnd(&z->strm);
    z->live = 0;
  }
}

/* Ends the stream (idempotent) and tells V8 its native memory is gone. */
static void zinflater_end(napi_env env, zinflater *z) {
  if (!z->live) return;
  zinflater_release(z);
  int64_t adjusted;
  napi_adjust_external_memory(env, -INFLATER_EXTERNAL_BYTES, &adjusted);
}

static void zinflater_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  zinflater *z = (zinflater *)data;
  zinflater_end(env, z);
  free(z);
}

/* Reads a JS number that must be an integer in [min, max]. Returns 0 and
 * throws otherwise. */
static int get_int(napi_env env, napi_value v, const char *name, double min, double max,
                   double *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a number", name);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
    return 0;
  }
  double d;
  napi_get_value_double(env, v, &d);
  if (!isfinite(d) || d != floor(d) || d < min || d > max) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s must be an integer in [%.0f, %.0f], got %g", name, min, max, d);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
    return 0;
  }
  *out = d;
  return 1;
}

/* Reads a Uint8Array (Buffer included); returns its data and length. */
static int get_bytes(napi_env env, napi_value v, const char *name, unsigned char **data,
                     size_t *length) {
  bool is_ta = false;
  napi_typedarray_type type;
  void *ptr = NULL;
  size_t len = 0;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, v, &type, &len, &ptr, NULL, NULL) != napi_ok ||
      type != napi_uint8_array) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a Uint8Array", name);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
    return 0;
  }
  *data = ptr ? (unsigned char *)ptr : &empty_byte;
  *length = ptr ? len : 0;
  return 1;
}

/* Resolves a handle to its live inflater; throws if it is not one of ours or
 * has been ended. */
static zinflater *get_inflater(napi_env env, napi_value v) {
  napi_valuetype t;
  bool tagged = false;
  void *data = NULL;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_object ||
      napi_check_object_type_tag(env, v, &ZINFLATER_TAG, &tagged) != napi_ok || !tagged ||
      napi_unwrap(env, v, &data) != napi_ok || data == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "handle must be a zinflate handle");
    return NULL;
  }
  zinflater *z = (zinflater *)data;
  if (!z->live || z->end_pending) {
    napi_throw_error(env, "ERR_ZINFLATE_CLOSED", "inflater has been ended");
    return NULL;
  }
  if (z->busy) {
    napi_throw_error(env, "ERR_ZINFLATE_BUSY", "inflater is running an inflateAsync job");
    return NULL;
  }
  return z;
}

/* zlib accepts 8..15 raw (negated), 8..15 zlib, +16 gzip, +32 auto; 0 means
 * "from the zlib header". inflateInit2 validates the exact set. */
#define WBITS_MIN (-15)
#define WBITS_MAX 47

static napi_value zlib_status_error(napi_env env, const char *fn, int status, z_stream *strm) {
  char msg[200];
  const char *detail = (strm && strm->msg) ? strm->msg : zError(status);
  snprintf(msg, sizeof msg, "%s failed: %s (%d)", fn, detail, status);
  if (status == Z_STREAM_ERROR)
    napi_throw_range_error(env, "ERR_ZLIB_STREAM", msg);
  else
    napi_throw_error(env, "ERR_ZLIB", msg);
  return NULL;
}

static napi_value js_create(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "create(windowBits) needs 1 argument");
    return NULL;
  }
  double wbits;
  if (!get_int(env, argv[0], "windowBits", WBITS_MIN, WBITS_MAX, &wbits)) return NULL;

  zinflater *z = (zinflater *)calloc(1, sizeof *z);
  if (!z) {
    napi_throw_error(env, "ERR_ZLIB_MEM", "out of memory allocating z_stream");
    return NULL;
  }
  int status = inflateInit2(&z->strm, (int)wbits);
  if (status != Z_OK) {
    free(z);
    return zlib_status_error(env, "inflateInit2", status, NULL);
  }
  z->live = 1;

  napi_value handle;
  if (napi_create_object(env, &handle) != napi_ok ||
      napi_wrap(env, handle, z, zinflater_finalize, NULL, NULL) != napi_ok) {
    zinflater_release(z);
    free(z);
    throw_last_error(env, "napi_wrap");
    return NULL;
  }
  /* From here the finalizer owns z. */
  int64_t adjusted;
  napi_adjust_external_memory(env, INFLATER_EXTERNAL_BYTES, &adjusted);
  CHECK_NAPI(env, napi_type_tag_object(env, handle, &ZINFLATER_TAG));
  return handle;
}

/* The arguments of inflate/inflateAsync, checked. */
typedef struct {
  zinflater *z;
  unsigned char *in, *out;
  size_t in_start, in_end, out_start, out_end;
  int flush;
  int32_t *result;
} inflate_args;

static int parse_inflate_args(napi_env env, napi_value *argv, inflate_args *a) {
  a->z = get_inflater(env, argv[0]);
  if (!a->z) return 0;
  size_t in_len, out_len;
  double in_start, in_end, out_start, out_end, flush;
  if (!get_bytes(env, argv[1], "input", &a->in, &in_len)) return 0;
  if (!get_int(env, argv[2], "inStart", 0, (double)in_len, &in_start)) return 0;
  if (!get_int(env, argv[3], "inEnd", in_start, (double)in_len, &in_end)) return 0;
  if (!get_bytes(env, argv[4], "output", &a->out, &out_len)) return 0;
  if (!get_int(env, argv[5], "outStart", 0, (double)out_len, &out_start)) return 0;
  if (!get_int(env, argv[6], "outEnd", out_start, (double)out_len, &out_end)) return 0;
  if (!get_int(env, argv[7], "flush", Z_NO_FLUSH, Z_TREES, &flush)) return 0;
  /* avail_in/avail_out are 32-bit, and produced/consumed go to an Int32Array. */
  if (in_end - in_start > INT32_MAX || out_end - out_start > INT32_MAX) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "input and output ranges must be < 2 GiB");
    return 0;
  }
  bool is_ta = false;
  napi_typedarray_type rtype;
  size_t rlen = 0;
  void *rptr = NULL;
  if (napi_is_typedarray(env, argv[8], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, argv[8], &rtype, &rlen, &rptr, NULL, NULL) != napi_ok ||
      rtype != napi_int32_array || rlen < 4 || rptr == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "result must be an Int32Array of length >= 4");
    return 0;
  }
  a->in_start = (size_t)in_start;
  a->in_end = (size_t)in_end;
  a->out_start = (size_t)out_start;
  a->out_end = (size_t)out_end;
  a->flush = (int)flush;
  a->result = (int32_t *)rptr;
  return 1;
}

/* One inflate() call; fills result[0..3]. Touches no JS: runs on the inflate threads too. */
static void run_inflate(inflate_args *a) {
  z_stream *s = &a->z->strm;
  s->next_in = a->in + a->in_start;
  s->avail_in = (uInt)(a->in_end - a->in_start);
  s->next_out = a->out + a->out_start;
  s->avail_out = (uInt)(a->out_end - a->out_start);
  int status = inflate(s, a->flush);
  a->result[0] = status;
  a->result[1] = (int32_t)((a->in_end - a->in_start) - s->avail_in);
  a->result[2] = (int32_t)((a->out_end - a->out_start) - s->avail_out);
  a->result[3] = s->data_type;
  /* The buffers belong to JS and may move or die before the next call. */
  s->next_in = Z_NULL;
  s->avail_in = 0;
  s->next_out = Z_NULL;
  s->avail_out = 0;
}

static napi_value js_inflate(napi_env env, napi_callback_info info) {
  size_t argc = 9;
  napi_value argv[9];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 9) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS",
                          "inflate(handle, input, inStart, inEnd, output, outStart, outEnd, "
                          "flush, result) needs 9 arguments");
    return NULL;
  }
  inflate_args a;
  if (!parse_inflate_args(env, argv, &a)) return NULL;
  run_inflate(&a);
  return NULL;
}

/* inflateAsync: the same call on one of this addon's own threads (not libuv's pool: a process
 * that reads its own FUSE mounts through node:fs can have every pool thread blocked in a read
 * that waits for this very inflation). A job holds references to the handle, both buffers, the
 * result array and the callback until it completes, so none of them can be collected under it;
 * the handle is busy meanwhile (other calls throw, end() is deferred). The caller must not write
 * to input, nor touch output[outStart, outEnd), until the callback. Completions reach the main
 * thread through a thread-safe function, referenced only while jobs are pending (an idle
 * inflater thread keeps no process alive). */
#define INFLATE_THREADS 2

typedef struct inflate_job {
  inflate_args a;
  napi_ref refs[5]; /* handle, input, output, result, callback */
  struct inflate_job *next;
} inflate_job;

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  inflate_job *head, *tail;
  pthread_t threads[INFLATE_THREADS];
  int nthreads;
  int quit;
  napi_threadsafe_function tsfn;
  size_t pending; /* queued or running; main thread only */
} inflate_pool;

static void *inflate_worker(void *arg) {
  inflate_pool *p = (inflate_pool *)arg;
  for (;;) {
    pthread_mutex_lock(&p->mu);
    while (p->head == NULL && !p->quit) pthread_cond_wait(&p->cv, &p->mu);
    if (p->quit) {
      pthread_mutex_unlock(&p->mu);
      return NULL;
    }
    inflate_job *job = p->head;
    p->head = job->next;
    if (p->head == NULL) p->tail = NULL;
    pthread_mutex_unlock(&p->mu);
    run_inflate(&job->a);
    if (napi_call_threadsafe_function(p->tsfn, job, napi_tsfn_blocking) != napi_ok) {
      /* Closing (the environment is going away): the job dies with it. */
    }
  }
}

static void inflate_job_done(napi_env env, napi_value js_cb, void *context, void *data) {
  (void)js_cb;
  inflate_pool *p = (inflate_pool *)context;
  inflate_job *job = (inflate_job *)data;
  if (env == NULL) { /* the function is being torn down: no JS to call */
    free(job);
    return;
  }
  zinflater *z = job->a.z;
  z->busy = 0;
  if (z->end_pending) {
    z->end_pending = 0;
    zinflater_end(env, z);
  }
  napi_value cb = NULL, global = NULL, arg = NULL;
  napi_get_reference_value(env, job->refs[4], &cb);
  napi_get_global(env, &global);
  napi_get_null(env, &arg);
  for (int i = 0; i < 5; i++) napi_delete_reference(env, job->refs[i]);
  free(job);
  if (--p->pending == 0) napi_unref_threadsafe_function(env, p->tsfn);
  if (cb != NULL) napi_call_function(env, global, cb, 1, &arg, NULL);
}

static void inflate_pool_cleanup(void *arg) {
  inflate_pool *p = (inflate_pool *)arg;
  pthread_mutex_lock(&p->mu);
  p->quit = 1;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
  napi_release_threadsafe_function(p->tsfn, napi_tsfn_abort);
  /* Jobs still queued hold references into a dying environment: left to it. */
}

/* The environment's pool, started on first use. NULL (and a JS error thrown) on failure. */
static inflate_pool *get_pool(napi_env env) {
  inflate_pool *p = NULL;
  if (napi_get_instance_data(env, (void **)&p) == napi_ok && p != NULL) return p;
  p = (inflate_pool *)calloc(1, sizeof *p);
  if (!p) {
    napi_throw_error(env, "ERR_ZLIB_MEM", "out of memory allocating the inflate pool");
    return NULL;
  }
  napi_value name;
  if (napi_create_string_utf8(env, "zinflate", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, NULL, NULL, p, inflate_job_done, &p->tsfn) != napi_ok) {
    free(p);
    throw_last_error(env, "napi_create_threadsafe_function");
    return NULL;
  }
  napi_unref_threadsafe_function(env, p->tsfn);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  for (int i = 0; i < INFLATE_THREADS; i++) {
    if (pthread_create(&p->threads[i], NULL, inflate_worker, p) != 0) break;
    p->nthreads++;
  }
  if (p->nthreads == 0) {
    napi_release_threadsafe_function(p->tsfn, napi_tsfn_abort);
    free(p);
    napi_throw_error(env, "ERR_ZINFLATE_THREAD", "cannot start an inflate thread");
    return NULL;
  }
  napi_set_instance_data(env, p, NULL, NULL);
  napi_add_env_cleanup_hook(env, inflate_pool_cleanup, p);
  return p;
}

static napi_value js_inflate_async(napi_env env, napi_callback_info info) {
  size_t argc = 10;
  napi_value argv[10];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 10) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS",
                          "inflateAsync(handle, input, inStart, inEnd, output, outStart, outEnd, "
                          "flush, result, callback) needs 10 arguments");
    return NULL;
  }
  napi_valuetype t;
  if (napi_typeof(env, argv[9], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "callback must be a function");
    return NULL;
  }
  inflate_pool *p = get_pool(env);
  if (!p) return NULL;
  inflate_job *job = (inflate_job *)calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, "ERR_ZLIB_MEM", "out of memory allocating an inflate job");
    return NULL;
  }
  if (!parse_inflate_args(env, argv, &job->a)) {
    free(job);
    return NULL;
  }
  napi_value held[5] = {argv[0], argv[1], argv[4], argv[8], argv[9]};
  int made = 0;
  for (; made < 5; made++)
    if (napi_create_reference(env, held[made], 1, &job->refs[made]) != napi_ok) break;
  if (made < 5) {
    for (int i = 0; i < made; i++) napi_delete_reference(env, job->refs[i]);
    free(job);
    throw_last_error(env, "napi_create_reference");
    return NULL;
  }
  job->a.z->busy = 1;
  if (p->pending++ == 0) napi_ref_threadsafe_function(env, p->tsfn);
  pthread_mutex_lock(&p->mu);
  if (p->tail) p->tail->next = job;
  else p->head = job;
  p->tail = job;
  pthread_cond_signal(&p->cv);
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

static napi_value js_reset(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "reset(handle, windowBits) needs 2 arguments");
    return NULL;
  }
  zinflater *z = get_inflater(env, argv[0]);
  if (!z) return NULL;
  double wbits;
  if (!get_int(env, argv[1], "windowBits", WBITS_MIN, WBITS_MAX, &wbits)) return NULL;
  napi_value ret;
  CHECK_NAPI(env, napi_create_int32(env, inflateReset2(&z->strm, (int)wbits), &ret));
  return ret;
}

static napi_value js_prime(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "prime(handle, bits, value) needs 3 arguments");
    return NULL;
  }
  zinflater *z = get_inflater(env, argv[0]);
  if (!z) return NULL;
  double bits, value;
  if (!get_int(env, argv[1], "bits", 0, 16, &bits)) return NULL;
  if (!get_int(env, argv[2], "value", INT32_MIN, INT32_MAX, &value)) return NULL;
  napi_value ret;
  CHECK_NAPI(env, napi_create_int32(env, inflatePrime(&z->strm, (int)bits, (int)value), &ret));
  return ret;
}

static napi_value js_set_dictionary(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "setDictionary(handle, dictionary) needs 2 arguments");
    return NULL;
  }
  zinflater *z = get_inflater(env, argv[0]);
  if (!z) return NULL;
  unsigned char *dict;
  size_t dict_len;
  if (!get_bytes(env, argv[1], "dictionary", &dict, &dict_len)) return NULL;
  if (dict_len > UINT_MAX) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "dictionary too large");
    return NULL;
  }
  napi_value ret;
  CHECK_NAPI(env, napi_create_int32(env, inflateSetDictionary(&z->strm, dict, (uInt)dict_len), &ret));
  return ret;
}

static napi_value js_end(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "end(handle) needs 1 argument");
    return NULL;
  }
  napi_valuetype t;
  bool tagged = false;
  void *data = NULL;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_object ||
      napi_check_object_type_tag(env, argv[0], &ZINFLATER_TAG, &tagged) != napi_ok || !tagged ||
      napi_unwrap(env, argv[0], &data) != napi_ok || data == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "handle must be a zinflate handle");
    return NULL;
  }
  zinflater *z = (zinflater *)data;
  if (z->busy) {
    z->end_pending = 1; /* the job still uses strm */
    return NULL;
  }
  zinflater_end(env, z);
  /* The struct itself stays until the finalizer, so a stale handle throws
   * "inflater has been ended" rather than touching freed memory. */
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value version;
  CHECK_NAPI(env, napi_create_string_utf8(env, zlibVersion(), NAPI_AUTO_LENGTH, &version));
  napi_property_descriptor props[] = {
      {"create", NULL, js_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"inflate", NULL, js_inflate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"inflateAsync", NULL, js_inflate_async, NULL, NULL, NULL, napi_enumerable, NULL},
      {"reset", NULL, js_reset, NULL, NULL, NULL, napi_enumerable, NULL},
      {"prime", NULL, js_prime, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setDictionary", NULL, js_set_dictionary, NULL, NULL, NULL, napi_enumerable, NULL},
      {"end", NULL, js_end, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zlibVersion", NULL, NULL, NULL, NULL, version, napi_enumerable, NULL},
  };
  CHECK_NAPI(env, napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
