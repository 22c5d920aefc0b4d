"""Reports: one renderer per artefact — `tables` (markdown), `plots` (PNG), `html` (the HTML page of a
markdown report) — and `results`, the one results schema that diagnose, eval and demo write and compare reads."""
