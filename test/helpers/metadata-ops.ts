/**
 * A deterministic stream of valid snapshot metadata operations (prepare, view, commit, remove,
 * label update) and a plain model of the state they lead to. The crash test runs the stream
 * against a MetadataStore in a child process that is SIGKILLed midway, and compares what the
 * database holds afterwards with the model.
 */
import { mulberry32 } from './fault-proxy.js';

export type MetaOp =
  | { op: 'prepare'; key: string; parent: string; labels: Record<string, string> }
  | { op: 'view'; key: string; parent: string }
  | { op: 'commit'; key: string; name: string; labels: Record<string, string> }
  | { op: 'remove'; key: string }
  | { op: 'update'; key: string; labels: Record<string, string> };

export interface ModelEntry {
  kind: 'active' | 'committed' | 'view';
  parent: string;
  labels: Record<string, string>;
}

export type Model = Map<string, ModelEntry>;

export function applyOp(model: Model, o: MetaOp): void {
  switch (o.op) {
    case 'prepare':
      model.set(o.key, { kind: 'active', parent: o.parent, labels: { ...o.labels } });
      break;
    case 'view':
      model.set(o.key, { kind: 'view', parent: o.parent, labels: {} });
      break;
    case 'commit': {
      const cur = model.get(o.key);
      if (cur === undefined) throw new Error(`model: commit of missing ${o.key}`);
      model.delete(o.key);
      model.set(o.name, { kind: 'committed', parent: cur.parent, labels: { ...o.labels } });
      break;
    }
    case 'remove':
      model.delete(o.key);
      break;
    case 'update': {
      const cur = model.get(o.key);
      if (cur === undefined) throw new Error(`model: update of missing ${o.key}`);
      cur.labels = { ...o.labels };
      break;
    }
  }
}

/** A set with O(1) add, delete and random pick. */
class PickSet {
  private readonly items: string[] = [];
  private readonly index = new Map<string, number>();
  get size(): number {
    return this.items.length;
  }
  add(k: string): void {
    if (this.index.has(k)) return;
    this.index.set(k, this.items.length);
    this.items.push(k);
  }
  delete(k: string): void {
    const i = this.index.get(k);
    if (i === undefined) return;
    const last = this.items.pop() as string;
    if (last !== k) {
      this.items[i] = last;
      this.index.set(last, i);
    }
    this.index.delete(k);
  }
  pick(rnd: () => number): string {
    return this.items[Math.floor(rnd() * this.items.length)] as string;
  }
}

/** `count` operations from `seed`, each valid in the state the previous ones leave. */
export function planOps(seed: number, count: number): MetaOp[] {
  const rnd = mulberry32(seed);
  const all = new PickSet();
  const committed = new PickSet();
  const active = new PickSet();
  const childless = new PickSet();
  const parentOf = new Map<string, string>();
  const children = new Map<string, number>();
  const ops: MetaOp[] = [];
  let n = 0;
  const addChild = (key: string, parent: string): void => {
    all.add(key);
    childless.add(key);
    parentOf.set(key, parent);
    if (parent !== '') {
      children.set(parent, (children.get(parent) ?? 0) + 1);
      childless.delete(parent);
    }
  };
  const drop = (key: string): void => {
    all.delete(key);
    childless.delete(key);
    committed.delete(key);
    active.delete(key);
    const parent = parentOf.get(key) ?? '';
    parentOf.delete(key);
    if (parent !== '') {
      const c = (children.get(parent) ?? 1) - 1;
      children.set(parent, c);
      if (c === 0) childless.add(parent);
    }
  };
  while (ops.length < count) {
    const r = rnd();
    let o: MetaOp | undefined;
    if (r < 0.3) {
      const parent = committed.size > 0 && rnd() < 0.8 ? committed.pick(rnd) : '';
      o = { op: 'prepare', key: `k${n++}`, parent, labels: { seq: String(n) } };
      addChild(o.key, parent);
      active.add(o.key);
    } else if (r < 0.4 && committed.size > 0) {
      o = { op: 'view', key: `v${n++}`, parent: committed.pick(rnd) };
      addChild(o.key, o.parent);
    } else if (r < 0.7 && active.size > 0) {
      const key = active.pick(rnd);
      o = { op: 'commit', key, name: `c${n++}`, labels: { at: String(n) } };
      const parent = parentOf.get(key) ?? '';
      drop(key); // an active snapshot has no children: renaming is drop + add
      addChild(o.name, parent);
      committed.add(o.name);
    } else if (r < 0.85 && childless.size > 0 && all.size > 5) {
      o = { op: 'remove', key: childless.pick(rnd) };
      drop(o.key);
    } else if (all.size > 0) {
      o = { op: 'update', key: all.pick(rnd), labels: { u: String(n++) } };
    }
    if (o !== undefined) ops.push(o);
  }
  return ops;
}

export function modelAfter(ops: readonly MetaOp[], n: number): Model {
  const m: Model = new Map();
  for (const o of ops.slice(0, n)) applyOp(m, o);
  return m;
}
