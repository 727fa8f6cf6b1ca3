"""Engines: everything from a verified version folder to a runnable, warmed ensemble.

The data path, publish to live, in the order it runs:

- `compile` (in the short-lived process of `child`): load the members from their SavedModels
  and assemble them (`keras_members`), freeze the assembled function into one graph, convert it
  to TensorFlow Lite, and check each against the members;
- `compiled`: the result as one file, and the cache of those files shared by workers;
- `loader`: the server's side: compile or read from the cache, choose the engine, warm it up;
- the engines themselves, behind one interface (`base.Engine`: rows in, averaged and
  per-member probabilities out): `lite` (TensorFlow Lite) and `tensorflow` (the frozen graph).

Importing this package imports no TensorFlow; only `keras_members`, `compile` and `tensorflow`
do, and a server imports them only for a version that needs them.
"""
