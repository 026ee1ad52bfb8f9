/**
 * The OCI distribution client: references, registry host configuration, credentials, manifests
 * and platforms, and the registry client (manifests, blobs, range reads, push, referrers).
 */
export * from './errors.js';
export * from './reference.js';
export * from './hosts.js';
export * from './credentials.js';
export * from './manifest.js';
export * from './log.js';
export { parseWwwAuthenticate, type Challenge } from './auth.js';
export {
  DEFAULT_TIMEOUTS,
  DEFAULT_RETRY,
  retryCause,
  type Timeouts,
  type RetryOptions,
  type RetryCause,
  type RetryEvent,
  type RetryObserver,
  type RetryOperation,
} from './http.js';
export * from './registry.js';
