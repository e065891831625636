"""The project's own tooling, imported from the repository root (never part of the wheel).

- ``assets``: the test and benchmark assets (tokenizers, vocabularies, models) in the
  asset cache (``python -m tools.assets``);
- ``client_suites``, ``client_lists``, ``client_rewrites`` and the pytest plugin
  ``clients_plugin``: our users' test suites on genlm-anyio (``python -m tools.client_suites``);
- ``client_examples``: genlm-control's documented examples (``python -m tools.client_examples``);
- ``docs_roles``: the griffe extension that renders Sphinx roles in docstrings (``mkdocs.yml``).
"""
