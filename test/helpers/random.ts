/** Randomness for tests that must replay: a failure's seed reproduces it. */

/** A seeded xorshift32 generator: `next(n)` is an integer in [0, n) (0 when n < 1). */
export function seededRandom(seed: number): (n: number) => number {
  let s = seed >>> 0 || 1;
  return (n) => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) % Math.max(1, n);
  };
}
