"""The works bidsdl's methods text cites: one table, from which ``references.bib`` and the reports' reference lists
are written (and which ``CITATION.cff``'s references are checked against).

A key is cited in the methods text as ``[@key]`` (pandoc's syntax, as fMRIPrep's boilerplate does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """One work: ``kind`` is its BibTeX entry type; ``venue`` its journal, book or proceedings."""

    kind: str
    authors: tuple[str, ...]  # "Family, Given", in order
    title: str
    year: int
    venue: str = ""
    volume: str = ""
    pages: str = ""
    doi: str = ""
    url: str = ""

    def bibtex(self, key: str) -> str:
        venue_field = {"article": "journal", "inproceedings": "booktitle", "book": "publisher"}.get(self.kind, "note")
        fields = [("author", " and ".join(self.authors)), ("title", "{" + self.title + "}"), ("year", str(self.year)),
                  (venue_field, self.venue), ("volume", self.volume), ("pages", self.pages.replace("-", "--")),
                  ("doi", self.doi), ("url", self.url)]  # fmt: skip
        body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields if value)
        return f"@{self.kind}{{{key},\n{body}\n}}\n"

    def text(self) -> str:
        """The reference as a line of a reference list: authors (the first three, then et al.), year, title, venue."""
        names = [a.split(",")[0].strip() for a in self.authors]
        who = ", ".join(names[:3]) + (" et al." if len(names) > 3 else "")
        where = ", ".join(part for part in (self.venue, self.volume, self.pages) if part)
        link = f" doi:{self.doi}" if self.doi else (f" {self.url}" if self.url else "")
        return f"{who} ({self.year}). {self.title}." + (f" {where}." if where else "") + link


#: Every work the methods text may cite, by key.
REFERENCES: dict[str, Reference] = {
    "bidsdl": Reference("software", ("The bidsdl developers",), "bidsdl: a BIDS App for reproducible deep learning "
                        "on brain MRI", 2026, url="https://github.com/bidsdl/bidsdl"),
    "bids": Reference("article", ("Gorgolewski, Krzysztof J.", "Auer, Tibor", "Calhoun, Vince D.", "others"),
                      "The brain imaging data structure, a format for organizing and describing outputs of "
                      "neuroimaging experiments", 2016, "Scientific Data", "3", "160044", "10.1038/sdata.2016.44"),
    "bidsapps": Reference("article", ("Gorgolewski, Krzysztof J.", "Alfaro-Almagro, Fidel", "Auer, Tibor", "others"),
                          "BIDS apps: Improving ease of use, accessibility, and reproducibility of neuroimaging data "
                          "analysis methods", 2017, "PLOS Computational Biology", "13", "e1005209",
                          "10.1371/journal.pcbi.1005209"),
    "nipype": Reference("article", ("Gorgolewski, Krzysztof", "Burns, Christopher D.", "Madison, Cindee", "others"),
                        "Nipype: a flexible, lightweight and extensible neuroimaging data processing framework in "
                        "Python", 2011, "Frontiers in Neuroinformatics", "5", "13", "10.3389/fninf.2011.00013"),
    "pybids": Reference("article", ("Yarkoni, Tal", "Markiewicz, Christopher J.", "de la Vega, Alejandro", "others"),
                        "PyBIDS: Python tools for BIDS datasets", 2019, "Journal of Open Source Software", "4", "1294",
                        "10.21105/joss.01294"),
    "simpleitk": Reference("article", ("Lowekamp, Bradley C.", "Chen, David T.", "Ibáñez, Luis", "Blezek, Daniel"),
                           "The design of SimpleITK", 2013, "Frontiers in Neuroinformatics", "7", "45",
                           "10.3389/fninf.2013.00045"),
    "n4": Reference("article", ("Tustison, Nicholas J.", "Avants, Brian B.", "Cook, Philip A.", "others"),
                    "N4ITK: improved N3 bias correction", 2010, "IEEE Transactions on Medical Imaging", "29",
                    "1310-1320", "10.1109/TMI.2010.2046908"),
    "deepbet": Reference("article", ("Fisch, Lukas", "Zumdick, Stefan", "Barkhau, Carlotta", "others"),
                         "deepbet: Fast brain extraction of T1-weighted MRI using Convolutional Neural Networks", 2024,
                         "Computers in Biology and Medicine", "179", "108845",
                         "10.1016/j.compbiomed.2024.108845"),
    "mni2009": Reference("article", ("Fonov, Vladimir", "Evans, Alan C.", "Botteron, Kelly", "others"),
                         "Unbiased average age-appropriate atlases for pediatric studies", 2011, "NeuroImage", "54",
                         "313-327", "10.1016/j.neuroimage.2010.07.033"),
    "mattes": Reference("article", ("Mattes, David", "Haynor, David R.", "Vesselle, Hubert", "others"),
                        "PET-CT image registration in the chest using free-form deformations", 2003,
                        "IEEE Transactions on Medical Imaging", "22", "120-128", "10.1109/TMI.2002.808360"),
    "syn": Reference("article", ("Avants, Brian B.", "Epstein, Charles L.", "Grossman, Murray", "Gee, James C."),
                     "Symmetric diffeomorphic image registration with cross-correlation: evaluating automated "
                     "labeling of elderly and neurodegenerative brain", 2008, "Medical Image Analysis", "12", "26-41",
                     "10.1016/j.media.2007.06.004"),
    "antsx": Reference("article", ("Tustison, Nicholas J.", "Cook, Philip A.", "Holbrook, Andrew J.", "others"),
                       "The ANTsX ecosystem for quantitative biological and medical imaging", 2021,
                       "Scientific Reports", "11", "9068", "10.1038/s41598-021-87564-6"),
    "unifiedseg": Reference("article", ("Ashburner, John", "Friston, Karl J."), "Unified segmentation", 2005,
                            "NeuroImage", "26", "839-851", "10.1016/j.neuroimage.2005.02.018"),
    "vbm": Reference("article", ("Ashburner, John", "Friston, Karl J."), "Voxel-based morphometry: the methods", 2000,
                     "NeuroImage", "11", "805-821", "10.1006/nimg.2000.0582"),
    "desikan": Reference("article", ("Desikan, Rahul S.", "Ségonne, Florent", "Fischl, Bruce", "others"),
                         "An automated labeling system for subdividing the human cerebral cortex on MRI scans into "
                         "gyral based regions of interest", 2006, "NeuroImage", "31", "968-980",
                         "10.1016/j.neuroimage.2006.01.021"),
    "mriqc": Reference("article", ("Esteban, Oscar", "Birman, Daniel", "Schaer, Marie", "others"),
                       "MRIQC: Advancing the automatic prediction of image quality in MRI from unseen sites", 2017,
                       "PLOS ONE", "12", "e0184661", "10.1371/journal.pone.0184661"),
    "nilearn": Reference("article", ("Abraham, Alexandre", "Pedregosa, Fabian", "Eickenberg, Michael", "others"),
                         "Machine learning for neuroimaging with scikit-learn", 2014, "Frontiers in Neuroinformatics",
                         "8", "14", "10.3389/fninf.2014.00014"),
    "clinicadl": Reference("article", ("Wen, Junhao", "Thibeau-Sutre, Elina", "Diaz-Melo, Mauricio", "others"),
                           "Convolutional neural networks for classification of Alzheimer's disease: Overview and "
                           "reproducible evaluation", 2020, "Medical Image Analysis", "63", "101694",
                           "10.1016/j.media.2020.101694"),
    "pytorch": Reference("inproceedings", ("Paszke, Adam", "Gross, Sam", "Massa, Francisco", "others"),
                         "PyTorch: An Imperative Style, High-Performance Deep Learning Library", 2019,
                         "Advances in Neural Information Processing Systems 32", pages="8024-8035"),
    "monai": Reference("misc", ("Cardoso, M. Jorge", "Li, Wenqi", "Brown, Richard", "others"),
                       "MONAI: An open-source framework for deep learning in healthcare", 2022, "arXiv:2211.02701",
                       doi="10.48550/arXiv.2211.02701"),
    "sklearn": Reference("article", ("Pedregosa, Fabian", "Varoquaux, Gaël", "Gramfort, Alexandre", "others"),
                         "Scikit-learn: Machine Learning in Python", 2011, "Journal of Machine Learning Research",
                         "12", "2825-2830"),
    "adamw": Reference("inproceedings", ("Loshchilov, Ilya", "Hutter, Frank"), "Decoupled Weight Decay Regularization",
                       2019, "International Conference on Learning Representations"),
    "unet": Reference("inproceedings", ("Ronneberger, Olaf", "Fischer, Philipp", "Brox, Thomas"),
                      "U-Net: Convolutional Networks for Biomedical Image Segmentation", 2015,
                      "Medical Image Computing and Computer-Assisted Intervention (MICCAI)", pages="234-241",
                      doi="10.1007/978-3-319-24574-4_28"),
    "nnunet": Reference("article", ("Isensee, Fabian", "Jaeger, Paul F.", "Kohl, Simon A. A.", "others"),
                        "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation",
                        2021, "Nature Methods", "18", "203-211", "10.1038/s41592-020-01008-z"),
    "nestedcv": Reference("article", ("Varma, Sudhir", "Simon, Richard"), "Bias in error estimation when using "
                          "cross-validation for model selection", 2006, "BMC Bioinformatics", "7", "91",
                          "10.1186/1471-2105-7-91"),
    "bootstrap": Reference("book", ("Efron, Bradley", "Tibshirani, Robert J."), "An Introduction to the Bootstrap",
                           1993, "Chapman & Hall/CRC", doi="10.1201/9780429246593"),
    "permutation": Reference("article", ("Ojala, Markus", "Garriga, Gemma C."), "Permutation tests for studying "
                             "classifier performance", 2010, "Journal of Machine Learning Research", "11",
                             "1833-1863"),
    "leakage": Reference("article", ("Kapoor, Sayash", "Narayanan, Arvind"), "Leakage and the reproducibility crisis "
                         "in machine-learning-based science", 2023, "Patterns", "4", "100804",
                         "10.1016/j.patter.2023.100804"),
    "mahalanobis": Reference("inproceedings", ("Lee, Kimin", "Lee, Kibok", "Lee, Honglak", "Shin, Jinwoo"),
                             "A simple unified framework for detecting out-of-distribution samples and adversarial "
                             "attacks", 2018, "Advances in Neural Information Processing Systems 31",
                             pages="7167-7177"),
    "cauchy": Reference("article", ("Liu, Yaowu", "Xie, Jun"), "Cauchy combination test: a powerful test with analytic "
                        "p-value calculation under arbitrary dependency structures", 2020,
                        "Journal of the American Statistical Association", "115", "393-402",
                        "10.1080/01621459.2018.1554485"),
    "dice": Reference("article", ("Dice, Lee R.",), "Measures of the amount of ecologic association between species",
                      1945, "Ecology", "26", "297-302", "10.2307/1932409"),
}

_CITATION = re.compile(r"\[@([^\]]+)\]")


def cited(texts: Iterable[str]) -> list[str]:
    """The keys cited in ``texts`` (``[@a]``, ``[@a; @b]``), in order of first citation.

    >>> cited(["N4 [@n4; @simpleitk], then [@n4]"])
    ['n4', 'simpleitk']
    """
    keys: list[str] = []
    for text in texts:
        for group in _CITATION.findall(text):
            for key in (k.strip().lstrip("@") for k in group.split(";")):
                if key not in keys:
                    keys.append(key)
    return keys


def bibtex(keys: Iterable[str]) -> str:
    """``references.bib``: the entries of ``keys`` (each a key of :data:`REFERENCES`)."""
    return "\n".join(REFERENCES[key].bibtex(key) for key in keys)


def numbered(texts: Iterable[str], keys: list[str]) -> list[str]:
    """``texts`` with each citation ``[@a; @b]`` as numbers into ``keys`` (``[1, 2]``): for the HTML reports.

    >>> numbered(["N4 [@n4; @simpleitk]."], ["simpleitk", "n4"])
    ['N4 [2, 1].']
    """
    def number(match: re.Match[str]) -> str:
        return "[" + ", ".join(str(keys.index(k.strip().lstrip("@")) + 1) for k in match.group(1).split(";")) + "]"

    return [_CITATION.sub(number, text) for text in texts]
