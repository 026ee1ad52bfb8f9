/** Process entry of the `soci-ts` command (bin/soci-ts runs this). */
import { main } from './cli.js';

// A closed pipe (e.g. `soci-ts ztoc list Z | head`) is not an error.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});

process.exitCode = await main(process.argv);
