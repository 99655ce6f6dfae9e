"""The lab's studies: each trains many copies of one small model side by side and writes raw
results (under ``results/``) that its report turns into the tables and figures of a page in
``docs/``.

==============  ==================================  =======================================
study           run                                 report
==============  ==================================  =======================================
agreement       ``gaf study agreement``             ``gaf study agreement-report``
thresholds      ``gaf study thresholds``            ``gaf study thresholds-report``
collapse        ``gaf study collapse``              (the page quotes the JSON)
faults          ``gaf study faults``                ``gaf study faults --report-only``
compute         ``gaf study compute``               ``gaf study compute-report``
==============  ==================================  =======================================

``python -m gaflab.studies.<module>`` runs the same entry points.
"""

STUDIES = {
    "agreement": "gaflab.studies.agreement",
    "agreement-report": "gaflab.studies.agreement_report",
    "thresholds": "gaflab.studies.thresholds",
    "thresholds-report": "gaflab.studies.thresholds_report",
    "collapse": "gaflab.studies.collapse",
    "faults": "gaflab.studies.faults",
    "compute": "gaflab.studies.compute",
    "compute-report": "gaflab.studies.compute_report",
}
