/**
 * Registry credentials, found as the docker CLI finds them (docker/cli `configfile`, `credentials`
 * and docker-credential-helpers' client):
 *
 * 1. an explicit `--user user:password`;
 * 2. `config.json` in `$DOCKER_CONFIG` or `~/.docker` (or an explicit path):
 *    - `credHelpers[key]`, else `credsStore`: run `docker-credential-<name> get` with the server
 *      key on stdin; when a helper is configured it is the only source, as in docker;
 *    - otherwise `auths[key]` (`auth` = base64 `user:pass`, or `username`/`password`, or
 *      `identitytoken`), falling back to entries whose key reduces to the same host
 *      (`https://host/v1/` style keys).
 *
 * The key is the registry host (`host:port`), except Docker Hub (`docker.io`, `index.docker.io`,
 * `registry-1.docker.io`), whose key is `https://index.docker.io/v1/`.
 */

import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { CredentialsError } from './errors.js';

export type Credentials = { username: string; password: string } | { identityToken: string };

export interface CredentialsOptions {
  /** `user:password` as given to `--user`; wins over everything else. */
  user?: string;
  /** Path of `config.json`; default `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`. */
  configPath?: string;
  /** Environment for `DOCKER_CONFIG`, `HOME` and the helper (its `PATH` finds it). Default `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** How long a credential helper may take. Default 30 s. */
  helperTimeoutMs?: number;
}

/** Key of Docker Hub in `auths`/`credHelpers`, and the server URL its helpers are asked about. */
export const DOCKER_HUB_AUTH_KEY = 'https://index.docker.io/v1/';
const DOCKER_HUB_HOSTS = new Set(['docker.io', 'index.docker.io', 'registry-1.docker.io']);
/** Username a helper returns when the secret is an identity (refresh) token. */
const TOKEN_USERNAME = '<token>';
/** What helpers print (exit status 1) when they have nothing for the server. */
const NOT_FOUND_MESSAGE = 'credentials not found in native keychain';
const DEFAULT_HELPER_TIMEOUT_MS = 30_000;
const MAX_HELPER_OUTPUT = 1 << 20;

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

/** The `auths`/`credHelpers` key docker uses for a registry host. */
export function authConfigKey(host: string): string {
  return DOCKER_HUB_HOSTS.has(host) ? DOCKER_HUB_AUTH_KEY : host;
}

/**
 * Reduces a stored key (`https://host:5000/v2/`, `host:5000/path`, `host`) to `host[:port]`,
 * like docker's `ConvertToHostname`.
 */
export function convertToHostname(key: string): string {
  let rest = key;
  const scheme = rest.indexOf('://');
  if (scheme !== -1) {
    rest = rest.slice(scheme + 3);
    const end = rest.search(/[/?#]/);
    const authority = end === -1 ? rest : rest.slice(0, end);
    const at = authority.lastIndexOf('@');
    const host = at === -1 ? authority : authority.slice(at + 1);
    if (host !== '') return host.endsWith(':') ? host.slice(0, -1) : host;
  }
  const slash = rest.indexOf('/');
  return slash === -1 ? rest : rest.slice(0, slash);
}

/** Path of the docker config file for an environment. */
export function dockerConfigPath(env: NodeJS.ProcessEnv = process.env): string {
  const dir = env['DOCKER_CONFIG'] || join(env['HOME'] || homedir(), '.docker');
  return join(dir, 'config.json');
}

/** Parses a `--user` value. Only `user:password` is accepted (there is no prompt to ask for it). */
export function parseUserOption(value: string): Credentials {
  const colon = value.indexOf(':');
  if (colon <= 0) throw new CredentialsError('--user', 'expected user:password');
  return { username: value.slice(0, colon), password: value.slice(colon + 1) };
}

/** Renders credentials for logs: the username at most, never a secret or its length. */
export function redact(credentials: Credentials | undefined): string {
  if (credentials === undefined) return 'anonymous';
  if ('identityToken' in credentials) return 'identity token (redacted)';
  return `user ${JSON.stringify(credentials.username)} with password (redacted)`;
}

/** Field lookup as Go's encoding/json does it: exact name first, then case-insensitively. */
function field(obj: Json, name: string): unknown {
  if (Object.hasOwn(obj, name)) return obj[name];
  const lower = name.toLowerCase();
  const key = Object.keys(obj).find((k) => k.toLowerCase() === lower);
  return key === undefined ? undefined : obj[key];
}

function stringField(obj: Json, name: string, subject: string, where: string): string {
  const v = field(obj, name);
  if (v === undefined || v === null) return '';
  if (typeof v !== 'string') throw new CredentialsError(subject, `${where}.${name} must be a string`);
  return v;
}

/** 1-based line of a JSON.parse error position, without quoting the text (it may hold secrets). */
function jsonErrorLine(err: unknown, text: string): string {
  const message = err instanceof Error ? err.message : '';
  const line = /\(line (\d+) column \d+\)/.exec(message);
  if (line !== null) return ` at line ${line[1]}`;
  const pos = /at position (\d+)/.exec(message);
  if (pos !== null) return ` at line ${text.slice(0, Number(pos[1])).split('\n').length}`;
  return '';
}

async function readDockerConfig(path: string): Promise<Json | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw new CredentialsError(path, 'cannot read docker config', { cause: err });
  }
  if (text.trim() === '') return undefined; // docker accepts an empty file
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    // No `cause`: V8's message quotes the text around the error, which may be a secret.
    throw new CredentialsError(path, `not valid JSON${jsonErrorLine(err, text)}`);
  }
  if (!isObject(doc)) throw new CredentialsError(path, 'docker config must be a JSON object');
  return doc;
}

/** Decodes an `auth` value like docker's decodeAuth: strict base64 of `user:password`. */
function decodeAuth(auth: string, subject: string, where: string): { username: string; password: string } {
  const b64 = auth.replace(/[\r\n]/g, ''); // Go's decoder skips newlines
  if (b64.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) {
    throw new CredentialsError(subject, `${where}.auth is not valid base64`);
  }
  const decoded = Buffer.from(b64, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon <= 0) throw new CredentialsError(subject, `${where}.auth must encode user:password`);
  return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1).replace(/^\0+|\0+$/g, '') };
}

function credentialsFromAuthEntry(entry: unknown, subject: string, where: string): Credentials | undefined {
  if (!isObject(entry)) throw new CredentialsError(subject, `${where} must be an object`);
  const token = stringField(entry, 'identitytoken', subject, where);
  // An identity token is used in preference to a password, as docker does.
  if (token !== '') return { identityToken: token };
  const auth = stringField(entry, 'auth', subject, where);
  if (auth !== '') return decodeAuth(auth, subject, where);
  const username = stringField(entry, 'username', subject, where);
  const password = stringField(entry, 'password', subject, where);
  if (username === '' && password === '') return undefined;
  return { username, password };
}

/** `auths` lookup: the exact key, else the first key that reduces to the same host. */
function findAuthEntry(auths: Json, key: string, host: string): [string, unknown] | undefined {
  if (Object.hasOwn(auths, key)) return [key, auths[key]];
  const hub = DOCKER_HUB_HOSTS.has(host);
  for (const [k, v] of Object.entries(auths)) {
    const h = convertToHostname(k);
    if (hub ? DOCKER_HUB_HOSTS.has(h) : h === host) return [k, v];
  }
  return undefined;
}

/** First line of a helper's complaint, short and printable; nothing that looks like a JSON answer. */
function helperComplaint(out: string): string {
  const line = out.trim().split('\n')[0]?.trim() ?? '';
  if (line === '' || line.startsWith('{')) return '';
  const clean = line.replace(/[^\x20-\x7e]/g, '?');
  return `: ${clean.length > 200 ? `${clean.slice(0, 200)}…` : clean}`;
}

/**
 * Runs `docker-credential-<helper> get` with `serverUrl` on stdin. Undefined when the helper has
 * nothing for the server; {@link CredentialsError} when it is missing, fails, hangs or prints garbage.
 */
export async function runCredentialHelper(
  helper: string,
  serverUrl: string,
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<Credentials | undefined> {
  const program = `docker-credential-${helper}`;
  // A helper name is a suffix, not a path; refuse anything that would run another file.
  if (helper === '' || /[/\\\0]/.test(helper)) throw new CredentialsError(program, 'invalid credential helper name');
  const timeoutMs = opts.timeoutMs ?? DEFAULT_HELPER_TIMEOUT_MS;

  const { code, signal, stdout, stderr } = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>(
    (resolve, reject) => {
      const child = spawn(program, ['get'], { env: opts.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] });
      const out: Buffer[] = [];
      const errOut: Buffer[] = [];
      let outBytes = 0;
      let errBytes = 0;
      let settled = false;
      const finish = (fn: () => void): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        fn();
      };
      const abort = (err: CredentialsError): void => {
        finish(() => {
          child.kill('SIGKILL');
          // Don't wait for 'close': a grandchild may hold the pipes open.
          child.stdout.destroy();
          child.stderr.destroy();
          child.stdin.destroy();
          reject(err);
        });
      };
      const timer = setTimeout(() => abort(new CredentialsError(program, `credential helper timed out after ${timeoutMs} ms`)), timeoutMs);
      child.on('error', (err) => {
        const code = errnoCode(err);
        const reason =
          code === 'ENOENT' ? 'credential helper not found in PATH'
          : code === 'EACCES' ? 'credential helper is not executable'
          : 'cannot run credential helper';
        abort(new CredentialsError(program, reason, { cause: err }));
      });
      child.stdout.on('data', (chunk: Buffer) => {
        outBytes += chunk.length;
        if (outBytes > MAX_HELPER_OUTPUT) abort(new CredentialsError(program, 'credential helper printed too much'));
        else out.push(chunk);
      });
      child.stderr.on('data', (chunk: Buffer) => {
        // Kept only for the error message, so a little is enough.
        if (errBytes < 4096) errOut.push(chunk);
        errBytes += chunk.length;
      });
      // The helper may exit without reading stdin; EPIPE then is not our failure.
      child.stdin.on('error', () => {});
      child.stdin.end(serverUrl);
      child.on('close', (code, signal) =>
        finish(() => resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(errOut).toString('utf8') })),
      );
    },
  );

  if (code !== 0) {
    if (stdout.trim() === NOT_FOUND_MESSAGE) return undefined;
    const how = code === null ? `was killed by ${signal ?? 'a signal'}` : `exited with status ${code}`;
    throw new CredentialsError(program, `credential helper ${how}${helperComplaint(stdout) || helperComplaint(stderr)}`);
  }
  let answer: unknown;
  try {
    answer = JSON.parse(stdout);
  } catch {
    // Neither the output nor the parser's message (which quotes it) goes into the error.
    throw new CredentialsError(program, 'credential helper printed something that is not a JSON object');
  }
  if (!isObject(answer)) throw new CredentialsError(program, 'credential helper printed something that is not a JSON object');
  const username = field(answer, 'Username') ?? '';
  const secret = field(answer, 'Secret') ?? '';
  if (typeof username !== 'string' || typeof secret !== 'string') {
    throw new CredentialsError(program, 'credential helper answer needs string "Username" and "Secret"');
  }
  if (username === '' && secret === '') return undefined;
  if (username === TOKEN_USERNAME) return { identityToken: secret };
  return { username, password: secret };
}

/**
 * Credentials for registry `host` (as in the image reference: `docker.io`, `ghcr.io`,
 * `localhost:5000`), or undefined for anonymous access.
 */
export async function resolveCredentials(host: string, opts: CredentialsOptions = {}): Promise<Credentials | undefined> {
  if (opts.user !== undefined) return parseUserOption(opts.user);
  const env = opts.env ?? process.env;
  const path = opts.configPath ?? dockerConfigPath(env);
  const config = await readDockerConfig(path);
  if (config === undefined) return undefined;
  const key = authConfigKey(host);

  const helpers = field(config, 'credHelpers') ?? undefined;
  if (helpers !== undefined && !isObject(helpers)) throw new CredentialsError(path, 'credHelpers must be an object');
  const store = field(config, 'credsStore') ?? undefined;
  if (store !== undefined && typeof store !== 'string') throw new CredentialsError(path, 'credsStore must be a string');
  // credHelpers is matched on the exact key, as docker does; hasOwn keeps "constructor" & co. out.
  const helper = helpers !== undefined && Object.hasOwn(helpers, key) ? helpers[key] : store;
  if (helper !== undefined && helper !== null && helper !== '') {
    if (typeof helper !== 'string') throw new CredentialsError(path, `credHelpers[${JSON.stringify(key)}] must be a string`);
    return runCredentialHelper(helper, key, { env, timeoutMs: opts.helperTimeoutMs });
  }

  const auths = field(config, 'auths');
  if (auths === undefined || auths === null) return undefined;
  if (!isObject(auths)) throw new CredentialsError(path, 'auths must be an object');
  const found = findAuthEntry(auths, key, host);
  if (found === undefined) return undefined;
  return credentialsFromAuthEntry(found[1], path, `auths[${JSON.stringify(found[0])}]`);
}
