"""Report: one self-contained HTML page and a Markdown model card per project.

The page (``report/index.html``, ``templates/page.html.j2``; images embedded as data URIs so it
travels alone and shows inside ``snakemake --report``) has: data summary (images/patients per
split and class, quarantined files by reason, the de-identification audit), the hyperparameter
search, the training curves, every evaluate output (metrics with confidence intervals, the
decision rule chosen on validation, test-time augmentation's effect when enabled, confusion, ROC,
PR, calibration, subgroup audit, Grad-CAM / Integrated Gradients with the randomization check,
adversarial robustness), the predictions on each predict source's new data (their summaries)
and the model card (:mod:`haven.report.card`).

Every file read or written is named by the caller (:class:`~haven.report.artefacts.Inputs`,
:class:`~haven.report.artefacts.Outputs`: rule report's declared inputs and outputs); which
evaluate plots exist is the rules' knowledge, the page only places each by its name.
"""

from __future__ import annotations

import logging
from pathlib import Path

from haven.io import atomic_write_text
from haven.report import findings as f
from haven.report.artefacts import Artefacts, Inputs, Outputs, image_data, load
from haven.report.card import applied, hyperparameters, log_card, model_card
from haven.report.curves import plot_history
from haven.report.render import render

log = logging.getLogger("haven")

# (anchor, title) of the page's sections, in page order: the navigation links to each
SECTIONS = (("data", "Data"), ("search", "Hyperparameter search"), ("training", "Training"),
            ("metrics", "Test metrics"), ("calibration", "Calibration"), ("bias", "Subgroup audit"),
            ("interpretability", "Interpretability"), ("robustness", "Adversarial robustness"),
            ("predictions", "Predictions on new data"), ("card", "Model card"))


def project_report(inputs: Inputs, outputs: Outputs, s: dict) -> Path:
    """Write the page, the card (twice) and the training curves; returns the page's path."""
    for path in (outputs.html, outputs.card, outputs.card_with_model, outputs.curves):
        path.parent.mkdir(parents=True, exist_ok=True)
    a = load(inputs)
    plot_history(a.history, outputs.curves)
    card = model_card(s["project"], s, a)
    atomic_write_text(outputs.card, card)
    atomic_write_text(outputs.card_with_model, card)
    log_card(s, a.run, outputs.card_with_model)
    return atomic_write_text(outputs.html, page(s["project"], a, inputs, outputs, card))


def page(project: str, a: Artefacts, inputs: Inputs, outputs: Outputs, card: str) -> str:
    plots = {name: image_data(path) for name, path in inputs.plots.items()}
    placed: set[str] = set()

    def plot(name: str) -> str | None:
        """The template asks for each plot by name; one not given shows as "not available"."""
        placed.add(name)
        return plots.get(name)

    m = a.metrics
    sg, rob, cal = m.get("subgroups", {}), m.get("robustness", {}), m.get("calibration", {})
    trials_rows, trials_header = f.trials_table(a.trials) or ([], ())
    cv_rows, cv_header, cv_note = f.cv_table(a.run)
    text = render(
        "page.html.j2", project=project, sections=SECTIONS, plot=plot, search=image_data(inputs.search),
        curves=image_data(outputs.curves), split_rows=f.split_rows(a.stats), quarantine=a.quarantine,
        n_quarantined=sum(n for _, n in a.quarantine), audit=a.audit, pixel_text=f.pixel_text(a.audit),
        accepted_rows=f.accepted_rows(a.audit), best=a.best,
        trials_rows=trials_rows, trials_header=trials_header, cv_rows=cv_rows, cv_header=cv_header, cv_note=cv_note, metric_rows=f.metric_rows(m),
        per_class_rows=f.per_class_rows(m), task_tables=f.task_tables(m), ci_note=f.ci_note(m), calibration_rows=f.calibration_rows(cal),
        calibration_note=f.calibration_note(cal), flagged=sg.get("flagged"), subgroup_summary=f.subgroup_summary(sg),
        gap_rows=f.gap_rows(sg), subgroup_rows=f.subgroup_rows(sg), subgroup_header=f.subgroup_header(sg),
        explain_summary=f.explain_summary(m.get("explain", {})), robustness=rob,
        robustness_rows=f.robustness_rows(rob), robustness_note=f.robustness_note(rob) if rob else "", card=card,
        **applied(a), **hyperparameters(a.best))
    # a plot the rules pass but the template does not place (a new evaluate output) would be
    # silently missing from the page: say so in the job's log
    for name in sorted(set(plots) - placed):
        log.warning("evaluate plot %r has no place on the page (templates/page.html.j2): not shown", name)
    return text
