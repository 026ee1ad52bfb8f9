# fuse: fuse-native's binding with a native read path (see fuse-fast.c). scripts/setup builds it
# offline and puts it where fuse-native loads its binding from (build/Release beats prebuilds).
{
  "targets": [
    {
      "target_name": "fuse",
      "sources": ["fuse-fast.c"],
      # fuse-native's own source, by absolute path: its directory must not be on the include
      # path (its semaphore.h would shadow the system's).
      "defines": ["FUSE_NATIVE_C=\"<!(node -p \"require.resolve('fuse-native/fuse-native.c')\")\""],
      "include_dirs": [
        "<!(node -p \"require('path').dirname(require.resolve('napi-macros/package.json'))\")",
        "<!(node -e \"require('fuse-shared-library/include')\")"
      ],
      # Debian's libfuse2 by its soname, as fuse-native's prebuilt binding links it.
      "libraries": ["-l:libfuse.so.2", "-lpthread"],
      "cflags": ["-O2", "-g", "-Wall", "-Wno-unused-parameter", "-Wno-unused-function", "-Wno-unused-variable", "-Wno-sign-compare"]
    }
  ]
}
