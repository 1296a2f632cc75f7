"""report: the per-project page and model card.

``page`` (the entry point, ``project_report``) reads the upstream files named by ``artefacts``'
``Inputs``, turns them into rows and notes (``findings``), draws the training curves (``curves``),
writes the model card (``card``) and the page through the Jinja2 templates in ``templates/``
(``render``). ``browser`` opens a page in headless Chromium (the tests' check)."""
