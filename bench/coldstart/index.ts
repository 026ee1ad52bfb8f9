/**
 * The cold-start benchmark (`soci-ts bench coldstart`, `npm run bench:coldstart`): how much
 * sooner a container starts with lazy loading (soci-ts) than with a full pull (overlayfs).
 */
export * from './types.js';
export { runColdstart, DEFAULT_OUT_DIR, DEFAULT_IMAGE_CACHE, METHOD, parseBytesRead, type ColdstartRunResult } from './run.js';
export { renderTable, renderMarkdown, renderSvg, writeReport, fmtMs, fmtBytes, fmtRatio, type WrittenReport } from './report.js';
export { median, quantile, spread, summarize, unavailable, speedups, idealMs, targetChecks } from './stats.js';
export { ShapingProxy, measureLink, RequestSniffer, ProxyError, type LinkShape, type ProxyOptions, type ProxyCounters, type LinkMeasurement } from './proxy.js';
export { parseWorkloads, readWorkloadsFile, WorkloadError, BUILTIN_IMAGES, READY_LINE } from './workloads.js';
export { BenchError, StepError, InterruptedError } from './proc.js';
