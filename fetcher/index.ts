/** The OCI distribution client: references, registry host configuration and credentials. */
export * from './errors.js';
export * from './reference.js';
export * from './hosts.js';
export * from './credentials.js';
