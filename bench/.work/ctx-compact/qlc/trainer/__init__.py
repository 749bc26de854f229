"""The trainer: the program that runs in the image, as a typed package.

It executes a compiled plan (qlc.compiler.plan.Plan) and decides nothing the plan holds: the
generated train.py names the settings, `recipe` runs them top to bottom (data -> model ->
engine -> adapter -> records). The build context carries this package verbatim (only the
modules the plan selects); tests, `qlc generate` and `qlc merge` import it directly.
"""
