"""The VLMEvalKit bridge (optional backend): the papers' benchmarks by their VLMEvalKit names.

Pure parts (always importable, no VLMEvalKit): `naming` (model_name), `messages` (message ->
processor inputs), `scores` (VLMEvalKit score table -> the record's main score), `tsv` (subset
TSVs, the built-in suite in VLMEvalKit's format, data location checks), `video` (the video sets' data
checks, frame policy, and how VLMEvalKit's loaders are pointed at local data). The VLMEvalKit side
(`isolate`, `model`, `run`) imports `vlmeval` only inside functions.
"""
