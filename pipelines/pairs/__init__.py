"""Pair building: LR/HR pairs from buckets of photos (Ray Data), stored as committed dataset versions.

| module       | what                                                                                   |
| ------------ | -------------------------------------------------------------------------------------- |
| `transforms` | per-file transforms on numpy/PIL (recipes, keys, splits, patch seeds), no Ray           |
| `build`      | `build_pairs()`: list → Ray Data tasks → Parquet shards of a new version (jobs/build_pairs.py) |
| `store`      | committed versions: `_SUMMARY.json` written last, readers read only what it lists (`read_part`) |
"""
