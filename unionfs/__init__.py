"""unionfs: overlayfs semantics over read-only layers and a writable upper, served with FUSE.

The core (layers, tarlayer, whiteout, resolve, upper, union, inodes) is pure Python and knows
nothing of FUSE; ``fuse_ops`` and ``mount`` are the only modules that import pyfuse3."""
