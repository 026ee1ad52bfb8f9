/**
 * The daemon's config parser (a pure parser: TOML text in, settings or a ConfigError out):
 * every key with its section, sizes and durations in their spellings, and the errors naming the
 * key and the file.
 */
import t from 'tap';
import { ConfigError, DEFAULT_CONFIG, parseConfig } from '../../daemon/config.js';

t.test('every key, sections, sizes and durations', async (t) => {
  const c = parseConfig(
    `root = "/srv/soci"
address = "/run/x.sock"
log_level = "debug"
hosts_dir = ""
docker_config = "/etc/soci-ts/docker.json"

[snapshotter]
remote = false
min_layer_size = "10MiB"
fuse_manager_address = "/run/fm.sock"
fuse_manager_log_max_size = "1MiB"
fuse_manager_log_files = 0

[blob]
fetch_timeout = "1m"
max_retries = 0
connect_timeout = "2s"
response_timeout = "45s"
max_connections_per_host = 16

[background_fetch]
enabled = false
rate = 1048576
start_delay = "500ms"

[cache]
memory_size = "64MiB"
disk_size = "2GiB"

[pull_modes.soci_v1]
enable = false

[pull_modes.soci_v2]
enable = false
`,
    'c.toml',
  );
  t.same(c, {
    root: '/srv/soci',
    address: '/run/x.sock',
    logLevel: 'debug',
    hostsDir: '',
    dockerConfig: '/etc/soci-ts/docker.json',
    remote: false,
    minLayerSize: 10 << 20,
    fuseManagerAddress: '/run/fm.sock',
    fuseManagerLogMaxBytes: 1 << 20,
    fuseManagerLogFiles: 0,
    fetchTimeoutMs: 60_000,
    maxRetries: 0,
    connectTimeoutMs: 2000,
    responseTimeoutMs: 45_000,
    maxConnectionsPerHost: 16,
    backgroundFetch: false,
    backgroundRate: 1 << 20,
    backgroundStartDelayMs: 500,
    memoryCacheBytes: 64 << 20,
    diskCacheBytes: 2 * 1024 * 1024 * 1024,
    sociV1: false,
    sociV2: false,
  });
  t.same(parseConfig('', 'empty.toml'), {}, 'an empty file sets nothing');
  t.same(parseConfig('[blob]\nfetch_timeout = 5\n', 'x'), { fetchTimeoutMs: 5000 }, 'a bare number of seconds');
  t.same(parseConfig('[snapshotter]\nmin_layer_size = 0\n', 'x'), { minLayerSize: 0 }, 'min_layer_size 0 (every indexed layer lazy)');
  t.equal(DEFAULT_CONFIG.minLayerSize, 0, "default min_layer_size is upstream's daemon's: 0");
  t.equal(DEFAULT_CONFIG.remote, true);
  t.equal(DEFAULT_CONFIG.backgroundFetch, true);
  t.same([DEFAULT_CONFIG.sociV1, DEFAULT_CONFIG.sociV2], [true, true], 'both pull modes on by default (upstream: v1 off; see the README)');
  t.same(parseConfig('[pull_modes]\n[pull_modes.soci_v1]\nenable = true\n', 'x'), { sociV1: true }, 'nested sections, with the outer one written too');
  t.same(parseConfig('pull_modes = { soci_v2 = { enable = false } }\n', 'x'), { sociV2: false }, 'the same as inline tables');
  t.same(parseConfig('[pull_modes]\nsoci_v1.enable = false\n', 'x'), { sociV1: false }, 'a dotted key in the outer section');
});

t.test('errors name the key and the file', async (t) => {
  const bad: Array<[string, RegExp]> = [
    ['nope = 1\n', /^f\.toml: unknown key "nope"/],
    ['[cache]\nmemory = "1MiB"\n', /^f\.toml: unknown key "cache\.memory"/],
    ['[nosuch]\nx = 1\n', /^f\.toml: unknown key "nosuch" /],
    ['cache = 5\n', /^f\.toml: key "cache" must be a table \(\[cache\]\)/],
    ['[cache]\ndisk_size = "lots"\n', /^f\.toml: key "cache\.disk_size" must be a size .* \(got "lots"\)/],
    ['[cache]\ndisk_size = 0\n', /key "cache\.disk_size" must be a whole number of bytes, at least 1/],
    ['[snapshotter]\nremote = "yes"\n', /key "snapshotter\.remote" must be true or false \(got "yes"\)/],
    ['[snapshotter]\nfuse_manager_log_files = 101\n', /key "snapshotter\.fuse_manager_log_files" must be a whole number from 0 to 100 \(got 101\)/],
    ['[snapshotter]\nfuse_manager_log_max_size = "1KB"\n', /key "snapshotter\.fuse_manager_log_max_size" must be a whole number of bytes, at least 1024/],
    ['[blob]\nfetch_timeout = "soon"\n', /key "blob\.fetch_timeout" must be a duration/],
    ['[blob]\nfetch_timeout = 0\n', /key "blob\.fetch_timeout" must be a positive duration/],
    ['[blob]\nmax_retries = 21\n', /key "blob\.max_retries" must be a whole number from 0 to 20 \(got 21\)/],
    ['[blob]\nmax_connections_per_host = 0\n', /key "blob\.max_connections_per_host" must be a whole number from 1 to 256 \(got 0\)/],
    ['[blob]\nconnect_timeout = "never"\n', /key "blob\.connect_timeout" must be a duration/],
    ['docker_config = "relative.json"\n', /key "docker_config" must be an absolute path or ""/],
    ['root = 5\n', /key "root" must be a string \(got 5\)/],
    ['[background_fetch\n', /^f\.toml: not valid TOML \(line 1/],
    ['[pull_modes.soci_v1]\nenable = "yes"\n', /^f\.toml: key "pull_modes\.soci_v1\.enable" must be true or false \(got "yes"\)/],
    ['[pull_modes.soci_v2]\nenable = 1\n', /key "pull_modes\.soci_v2\.enable" must be true or false \(got 1\)/],
    ['[pull_modes]\nsoci_v1 = true\n', /^f\.toml: key "pull_modes\.soci_v1" must be a table \(\[pull_modes\.soci_v1\]\) \(got true\)/],
    ['pull_modes = "v2"\n', /^f\.toml: key "pull_modes" must be a table \(\[pull_modes\]\)/],
    ['[pull_modes.soci_v2]\nenabled = false\n', /^f\.toml: unknown key "pull_modes\.soci_v2\.enabled"/],
    ['[pull_modes.parallel_pull_unpack]\nenable = true\n', /^f\.toml: unknown key "pull_modes\.parallel_pull_unpack" /],
  ];
  for (const [text, re] of bad) {
    t.throws(() => parseConfig(text, 'f.toml'), ConfigError, JSON.stringify(text));
    try {
      parseConfig(text, 'f.toml');
    } catch (e) {
      t.match((e as Error).message, re, (e as Error).message);
    }
  }
});
