# zinflate: N-API binding over zlib's raw inflate (see zinflate.c).
# Build offline: npm run build:native (npm passes nodedir=/usr from .npmrc),
# or node_modules/.bin/node-gyp rebuild -C ztoc/native --nodedir=/usr
{
  "targets": [
    {
      "target_name": "zinflate",
      "sources": ["zinflate.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      # Resolves to Node's exported zlib when Node has one, else libz.so.1.
      "libraries": ["-lz"]
    }
  ]
}
