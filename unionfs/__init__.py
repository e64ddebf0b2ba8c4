"""unionfs: overlayfs semantics over read-only layers and a writable upper, served with FUSE.

The core (layers, layerkinds, tarlayer, hostdir, whiteout, resolve, upper, union, inodes,
control) is pure Python and knows nothing of FUSE or of images; ``fuse_ops`` and ``mount``
(the daemon, ``python -m unionfs.mount``) are the only modules that import pyfuse3.
docs/architecture.md is the map."""
