"""Registry of the datasets pruneshot can prepare: where they live, what their files are, their shapes.

Pure data and standard library only: ``pruneshot.config`` reads it before any job starts, so
importing it must stay cheap. Loading and conversion live in :mod:`pruneshot.data.prepare`.

Every downloaded file is verified against a sha256. The publishers only give md5 sums; the
sha256 values below are those TensorFlow Datasets records for the same files (same names and
byte sizes), each with its source in a comment. ``data.download.checksums`` in the config
overrides them per dataset and file (for a mirror holding re-packed files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "test", "all")
"""Split names a config may ask for; ``all`` is train and test together (in that order)."""


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name at the base URL (and in the cache), size in bytes, sha256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DatasetSpec:
    """What pruneshot knows about a dataset.

    ``shape`` is the native image shape (C, H, W), None where the config decides it
    (imagefolder: ``data.image``). ``max_value`` is the largest pixel level. ``num_classes`` is
    None where only the data knows it. ``files`` maps each concrete split (train/test) to the
    files it needs; ``all`` needs the union. ``base_url`` is the official location (None: no
    download).
    """

    name: str
    shape: tuple[int, int, int] | None
    max_value: int
    num_classes: int | None
    splits: tuple[str, ...]
    base_url: str | None = None
    files: dict[str, tuple[RemoteFile, ...]] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None

    @property
    def downloads(self) -> bool:
        """True when the dataset is fetched over HTTP."""
        return self.base_url is not None

    def files_for(self, split: str) -> tuple[RemoteFile, ...]:
        """Files needed for ``split`` (train, test or all), each once, in a fixed order."""
        parts = ("train", "test") if split == "all" else (split,)
        out: list[RemoteFile] = []
        for part in parts:
            for f in self.files.get(part, ()):
                if f not in out:
                    out.append(f)
        return tuple(out)

    def all_files(self) -> tuple[RemoteFile, ...]:
        """Every file of the dataset (the allowed keys of a checksum override)."""
        return self.files_for("all") if self.files else ()


# sha256 source: tensorflow/datasets tensorflow_datasets/url_checksums/mnist.txt, recorded there for Google's
# cvdf-datasets copy of the original yann.lecun.com files (same names and byte sizes); other public projects
# pin the same four values for the ossci-datasets URL used here.
_MNIST_TRAIN = (
    RemoteFile("train-images-idx3-ubyte.gz", 9912422,
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    RemoteFile("train-labels-idx1-ubyte.gz", 28881,
               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
)
_MNIST_TEST = (
    RemoteFile("t10k-images-idx3-ubyte.gz", 1648877,
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", 4542,
               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
)

# sha256 source: tensorflow/datasets tensorflow_datasets/url_checksums/fashion_mnist.txt (this base URL).
_FASHION_TRAIN = (
    RemoteFile("train-images-idx3-ubyte.gz", 26421880,
               "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    RemoteFile("train-labels-idx1-ubyte.gz", 29515,
               "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
)
_FASHION_TEST = (
    RemoteFile("t10k-images-idx3-ubyte.gz", 4422102,
               "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", 5148,
               "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
)

# sha256 source: tensorflow/datasets tensorflow_datasets/url_checksums/cifar10.txt (this URL).
_CIFAR10 = RemoteFile("cifar-10-binary.tar.gz", 170052171,
                      "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")
# sha256 source: tensorflow/datasets tensorflow_datasets/url_checksums/cifar100.txt (this URL).
_CIFAR100 = RemoteFile("cifar-100-binary.tar.gz", 168513733,
                       "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec")

# sha256 source: tensorflow/datasets tensorflow_datasets/url_checksums/svhn_cropped.txt (these URLs).
# extra_32x32.mat (1.3 GB) is deliberately not offered.
_SVHN_TRAIN = RemoteFile("train_32x32.mat", 182040794,
                         "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8")
_SVHN_TEST = RemoteFile("test_32x32.mat", 64275384,
                        "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b")

CIFAR10_MEMBERS = {
    "train": tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("cifar-10-batches-bin/test_batch.bin",),
}
"""Members of cifar-10-binary.tar.gz per split (records: 1 label byte + 3072 pixel bytes)."""

CIFAR100_MEMBERS = {"train": ("cifar-100-binary/train.bin",), "test": ("cifar-100-binary/test.bin",)}
"""Members of cifar-100-binary.tar.gz per split (records: coarse and fine label bytes + 3072 pixels)."""

_DIGIT_NAMES = tuple(str(i) for i in range(10))
_CIFAR100_TEXT = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm"
)
_CIFAR100_NAMES = tuple(_CIFAR100_TEXT.split())

REGISTRY: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", (1, 8, 8), 16, 10, ("all",), class_names=_DIGIT_NAMES),
    # 10,000 real MNIST digits shipped in the package (pruneshot.data.mnist10k): no download, sha256-checked.
    "mnist10k": DatasetSpec("mnist10k", (1, 28, 28), 255, 10, ("all",), class_names=_DIGIT_NAMES),
    "mnist": DatasetSpec(
        "mnist", (1, 28, 28), 255, 10, SPLITS,
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's current location
        files={"train": _MNIST_TRAIN, "test": _MNIST_TEST}, class_names=_DIGIT_NAMES,
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", (1, 28, 28), 255, 10, SPLITS,
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        files={"train": _FASHION_TRAIN, "test": _FASHION_TEST},
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
    ),
    "cifar10": DatasetSpec(
        "cifar10", (3, 32, 32), 255, 10, SPLITS,
        base_url="https://www.cs.toronto.edu/~kriz/",
        files={"train": (_CIFAR10,), "test": (_CIFAR10,)},
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "cifar100": DatasetSpec(
        "cifar100", (3, 32, 32), 255, 100, SPLITS,
        base_url="https://www.cs.toronto.edu/~kriz/",
        files={"train": (_CIFAR100,), "test": (_CIFAR100,)}, class_names=_CIFAR100_NAMES,
    ),
    "svhn": DatasetSpec(
        "svhn", (3, 32, 32), 255, 10, SPLITS,
        base_url="http://ufldl.stanford.edu/housenumbers/",
        files={"train": (_SVHN_TRAIN,), "test": (_SVHN_TEST,)}, class_names=_DIGIT_NAMES,
    ),
    # A user's directory of class folders; shape and class count come from the config and the data.
    "imagefolder": DatasetSpec("imagefolder", None, 255, None, ("all",)),
}

DOWNLOADABLE = tuple(name for name, spec in REGISTRY.items() if spec.downloads)

ROLE_DEFAULT_SPLIT = {"source": "train", "target": "test"}
"""Split used when the config says ``split: null`` and the dataset has train/test splits."""


def get_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``; ValueError naming the allowed datasets otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(REGISTRY)}") from None


def resolve_split(name: str, split: str | None, role: str) -> str:
    """The concrete split of a config entry: ``split`` itself, or the default for ``role``.

    Datasets with train/test splits default to ``train`` for the source and ``test`` for targets;
    digits, mnist10k and imagefolder have only ``all``. Raises ValueError for a split the dataset lacks.
    """
    spec = get_spec(name)
    if split is None:
        split = ROLE_DEFAULT_SPLIT[role] if ROLE_DEFAULT_SPLIT[role] in spec.splits else "all"
    if split not in spec.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; allowed: {', '.join(spec.splits)}")
    return split


def effective_shape(name: str, image: dict | None) -> tuple[int, int, int] | None:
    """Image shape (C, H, W) after ``data.image`` reconciliation; None if it cannot be known.

    imagefolder images are read as RGB unless ``image.channels`` is 1, at ``image.size`` squared.
    """
    image = image or {}
    channels, size = image.get("channels"), image.get("size")
    native = get_spec(name).shape
    if native is None:
        return (channels or 3, size, size) if size else None
    c, h, w = native
    return (channels or c, size or h, size or w)
