"""The registry: immutable versions, aliases with history, publish/verify/rollback/gc (`store`), the watcher
(`watch`) and `understudy drafters ...` (`cli`). Torch-free: it depends only on the drafter's on-disk format."""
