/** SOCI index manifests: what we write is what upstream expects (§5 of the format spec), and parses back. */
import t from 'tap';
import { createHash } from 'node:crypto';
import {
  ANNOTATION_BUILD_TOOL,
  ANNOTATION_LAYER_DIGEST,
  ANNOTATION_LAYER_MEDIA_TYPE,
  ANNOTATION_SPAN_SIZE,
  buildSociIndex,
  EMPTY_CONFIG_BYTES,
  EMPTY_CONFIG_DIGEST,
  IndexFormatError,
  MEDIA_TYPE_SOCI_INDEX_V1,
  MEDIA_TYPE_SOCI_INDEX_V2,
  parseSociIndex,
  type IndexedLayer,
} from '../../ztoc/index.js';

const hex = (s: string): string => createHash('sha256').update(s).digest('hex');
const layers: IndexedLayer[] = [
  {
    layer: { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: `sha256:${hex('layer0')}`, size: 30 << 20 },
    ztoc: { digest: `sha256:${hex('ztoc0')}`, size: 123456 },
    spanSize: 4194304,
  },
  {
    layer: { mediaType: 'application/vnd.docker.image.rootfs.diff.tar.gzip', digest: `sha256:${hex('layer1')}`, size: 12 << 20 },
    ztoc: { digest: `sha256:${hex('ztoc1')}`, size: 2345 },
    spanSize: 1048576,
    disableXattrs: true,
  },
];
const subject = { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: `sha256:${hex('image')}`, size: 1234 };

t.test('the empty config blob is `{}` and its digest is the well-known one', async (t) => {
  t.equal(new TextDecoder().decode(EMPTY_CONFIG_BYTES), '{}');
  t.equal(`sha256:${createHash('sha256').update(EMPTY_CONFIG_BYTES).digest('hex')}`, EMPTY_CONFIG_DIGEST);
});

t.test('v1 index: manifest shape, annotations, subject', async (t) => {
  const { manifest, bytes, descriptor } = buildSociIndex({ version: 'v1', layers, subject, buildToolIdentifier: 'soci-ts test' });
  const doc = JSON.parse(new TextDecoder().decode(bytes));
  t.same(doc, manifest);
  t.equal(doc.schemaVersion, 2);
  t.equal(doc.mediaType, 'application/vnd.oci.image.manifest.v1+json');
  t.notOk('artifactType' in doc, 'no artifactType in the manifest body');
  t.same(doc.config, { mediaType: MEDIA_TYPE_SOCI_INDEX_V1, digest: EMPTY_CONFIG_DIGEST, size: 2 });
  t.same(doc.subject, subject);
  t.equal(doc.annotations[ANNOTATION_BUILD_TOOL], 'soci-ts test');
  t.equal(doc.layers.length, 2);
  for (const [i, l] of doc.layers.entries()) {
    t.equal(l.mediaType, 'application/octet-stream');
    t.equal(l.digest, layers[i].ztoc.digest);
    t.equal(l.size, layers[i].ztoc.size);
    t.equal(l.annotations[ANNOTATION_LAYER_DIGEST], layers[i].layer.digest);
    t.equal(l.annotations['com.amazon.soci.image-layer-mediaType'], layers[i].layer.mediaType, 'capital T');
    t.equal(l.annotations[ANNOTATION_SPAN_SIZE], String(layers[i].spanSize));
  }
  t.equal(doc.layers[0].annotations['com.amazon.soci.disable-xattrs'], undefined);
  t.equal(doc.layers[1].annotations['com.amazon.soci.disable-xattrs'], 'true');
  t.equal(descriptor.digest, `sha256:${createHash('sha256').update(bytes).digest('hex')}`);
  t.equal(descriptor.size, bytes.length);
  t.equal(descriptor.artifactType, MEDIA_TYPE_SOCI_INDEX_V1);
  // Keys come out in Go's order (sorted map keys) so equal indexes are equal bytes.
  t.same(Object.keys(doc.layers[0].annotations), [...Object.keys(doc.layers[0].annotations)].sort());
  t.match(new TextDecoder().decode(bytes), /^\{"schemaVersion":2,"mediaType":"[^"]+","config":/);

  const parsed = parseSociIndex(bytes, 'index.json');
  t.equal(parsed.version, 'v1');
  t.same(parsed.manifest, manifest);
  t.same(parsed.ztocs.map((z) => [z.layerDigest, z.layerMediaType, z.ztoc.digest, z.spanSize, z.disableXattrs]), [
    [layers[0].layer.digest, layers[0].layer.mediaType, layers[0].ztoc.digest, 4194304, false],
    [layers[1].layer.digest, layers[1].layer.mediaType, layers[1].ztoc.digest, 1048576, true],
  ]);
  t.equal(parsed.ztocs[0].layerMediaType, parsed.manifest.layers[0].annotations?.[ANNOTATION_LAYER_MEDIA_TYPE]);
});

t.test('v2 index: no subject, v2 config type', async (t) => {
  const { manifest } = buildSociIndex({ version: 'v2', layers, buildToolIdentifier: 'x' });
  t.equal(manifest.config.mediaType, MEDIA_TYPE_SOCI_INDEX_V2);
  t.notOk('subject' in manifest);
  t.equal(parseSociIndex(JSON.stringify(manifest)).version, 'v2');
  t.throws(() => buildSociIndex({ version: 'v2', layers, subject, buildToolIdentifier: 'x' }), { name: 'IndexFormatError' });
  t.throws(() => buildSociIndex({ version: 'v1', layers, buildToolIdentifier: 'x' }), { name: 'IndexFormatError' });
  t.throws(() => buildSociIndex({ version: 'v1', layers: [], subject, buildToolIdentifier: 'x' }), /empty/);
});

t.test('prefetch and unknown artifacts are kept apart', async (t) => {
  const prefetch = { mediaType: 'application/vnd.amazon.soci.prefetch.v1+json', digest: `sha256:${hex('p')}`, size: 10, annotations: { [ANNOTATION_LAYER_DIGEST]: layers[0].layer.digest } };
  const { manifest } = buildSociIndex({ version: 'v1', layers, subject, buildToolIdentifier: 'x', prefetch: [prefetch] });
  manifest.layers.push({ mediaType: 'application/x-future', digest: `sha256:${hex('f')}`, size: 1 });
  const parsed = parseSociIndex(JSON.stringify(manifest));
  t.equal(parsed.ztocs.length, 2);
  t.same(parsed.prefetch, [prefetch]);
  t.equal(parsed.unknown.length, 1);
});

t.test('malformed indexes are refused with the reason', async (t) => {
  const { manifest } = buildSociIndex({ version: 'v1', layers, subject, buildToolIdentifier: 'x' });
  const cases: Array<[string, unknown, RegExp]> = [
    ['not json', '{', /not JSON/],
    ['array', '[]', /not a JSON object/],
    ['schema', { ...manifest, schemaVersion: 1 }, /schemaVersion/],
    ['media type', { ...manifest, mediaType: 'application/vnd.oci.image.index.v1+json' }, /mediaType/],
    ['config type', { ...manifest, config: { ...manifest.config, mediaType: 'application/vnd.oci.image.config.v1+json' } }, /not a SOCI index type/],
    ['layers', { ...manifest, layers: {} }, /layers is not an array/],
    ['digest', { ...manifest, layers: [{ ...manifest.layers[0], digest: 'sha256:xyz' }] }, /not a sha256 digest/],
    ['size', { ...manifest, layers: [{ ...manifest.layers[0], size: -1 }] }, /size/],
    ['no layer digest', { ...manifest, layers: [{ ...manifest.layers[0], annotations: {} }] }, /image-layer-digest/],
    ['span size', { ...manifest, layers: [{ ...manifest.layers[0], annotations: { ...manifest.layers[0].annotations, [ANNOTATION_SPAN_SIZE]: 'big' } }] }, /span size/],
  ];
  for (const [name, doc, pattern] of cases) {
    try {
      parseSociIndex(typeof doc === 'string' ? doc : JSON.stringify(doc), 'idx.json');
      t.fail(`${name}: accepted`);
    } catch (err) {
      t.type(err, IndexFormatError, name);
      t.match(String(err), pattern, name);
      t.match(String(err), /idx\.json/, name);
    }
  }
});
