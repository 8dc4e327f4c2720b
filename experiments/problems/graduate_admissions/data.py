"""The graduate admissions data file: where it comes from and what a valid copy holds."""

from experiments.problems.tabular import TabularDataset

GRADUATE_ADMISSIONS = TabularDataset(
    name="graduate_admissions",
    filename="Admission_Predict_Ver1.1.csv",
    title="Graduate Admissions (Acharya et al. 2019), version 1.1",
    source="https://www.kaggle.com/datasets/mohansacharya/graduate-admissions",
    # Copies of the Kaggle file in public GitHub repositories, pinned to a commit so they
    # cannot change under us. Many copies online are edited (renamed or extra columns,
    # appended rows); the checksum rejects those, whatever their line endings or headers.
    urls=(
        "https://raw.githubusercontent.com/SwatantraJain-02/Admission-Prediction/"
        "994c229a9e879738975ba899d97855224dd7ec5e/Admission_Predict_Ver1.1.csv",
        "https://raw.githubusercontent.com/dannyzhang1020/Admission-Correlations/"
        "508acaf1e07b2457b4d6454a26243b4fa7980539/Admission_Predict_Ver1.1.csv",
    ),
    columns=(
        "Serial No.",
        "GRE Score",
        "TOEFL Score",
        "University Rating",
        "SOP",
        "LOR",
        "CGPA",
        "Research",
        "Chance of Admit",
    ),
    dropped=("Serial No.",),
    target="Chance of Admit",
    rows=500,
    ranges={
        "GRE Score": (260, 340),
        "TOEFL Score": (0, 120),
        "University Rating": (1, 5),
        "SOP": (1, 5),
        "LOR": (1, 5),
        "CGPA": (0, 10),
        "Research": (0, 1),
        "Chance of Admit": (0, 1),
    },
    checksum="308545cfa21c47179f8c0a955a74afbf3fc82337f9475ffe4faa1a0efaf691c1",
    known_impostors={400: "Admission_Predict.csv (version 1.0 of the data set, 400 rows)"},
)
