"""``mfmlip sample``: choose structures for the high level (DIRECT, random, narrow).

Reads candidate structures, encodes each with a trained model
(:func:`mfmlip.sampling.encode`), selects ``--n`` of them
(:func:`mfmlip.sampling.sample`) and writes the selected frames (extxyz, with
their frame number in the candidates file in ``info["source_index"]``) and a
PC1-PC2 plot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfmlip.cli import types
from mfmlip.sampling.select import METHODS, PICKS, POOLINGS

INDEX_KEY = "source_index"


def _read_candidates(path: str, index: str):
    """(atoms list, frame numbers in the file), errors naming the file."""
    from mfmlip.data.structures import DataError, read_frames

    if not Path(path).is_file():
        raise FileNotFoundError(f"candidates file {path} not found")
    try:
        frames, numbers = read_frames(Path(path), index)
    except Exception as err:  # ASE raises many types for malformed files
        raise DataError(f"{path}: cannot be read by ASE (index {index}): {type(err).__name__}: {err}") from None
    if not frames:
        raise DataError(f"{path}: no structures (index {index})")
    return frames, list(numbers)


def _options(args) -> dict:
    if args.method == "direct":
        return dict(n_clusters=args.n_clusters, k=args.k, n_components=args.pcs,
                    weight_pcs=not args.no_pc_weights, pick=args.pick, threshold=args.threshold)
    if args.method == "narrow":
        if not args.region:
            raise ValueError("--method narrow needs --region, e.g. --region 'PC1<-2.5,PC2>0'")
        from mfmlip.sampling import parse_region

        return dict(bounds=parse_region(args.region))  # bad text fails before the encoding
    return {}


def _check_arguments(args) -> None:
    if args.n is None and not (args.method == "direct" and args.n_clusters):
        raise ValueError("give --n (or, for --method direct, --n-clusters and --k)")
    direct_only = {"--n-clusters": args.n_clusters, "--k": args.k, "--threshold": args.threshold}
    given = [name for name, value in direct_only.items() if value is not None]
    if args.method != "direct" and given:
        raise ValueError(f"{', '.join(given)} only apply to --method direct")
    if args.method != "narrow" and args.region:
        raise ValueError("--region only applies to --method narrow")


def _write_frames(path: Path, frames, numbers, indices) -> None:
    import ase.io

    from mfmlip.atomic_io import atomic_write

    picked = []
    for i in indices:
        atoms = frames[i].copy()
        atoms.calc = frames[i].calc  # keep the labels (energy, forces) in the output
        old = atoms.info.get(INDEX_KEY)
        if old is not None and str(old) != str(numbers[i]):
            atoms.info[f"parent_{INDEX_KEY}"] = old
        atoms.info[INDEX_KEY] = int(numbers[i])
        picked.append(atoms)
    atomic_write(path, lambda fh: ase.io.write(fh, picked, format="extxyz"), mode="w")


def _sample(args) -> None:
    from mfmlip.model.serialization import load_model
    from mfmlip.sampling import encode, plot_selection, principal_components, sample
    from mfmlip.data.structures import unlabelled_structure

    _check_arguments(args)
    options = _options(args)
    model = load_model(args.model, device=args.device)
    fidelity = args.fidelity or model.fidelities[0]
    model.fidelity_index(fidelity)  # clear error before reading data
    frames, numbers = _read_candidates(args.candidates, args.index)
    structures = [unlabelled_structure(a, source=f"{args.candidates}: frame {k}", frame=k)
                  for a, k in zip(frames, numbers)]
    vectors = encode(structures, model, fidelity, batch_size=args.batch_size, pooling=args.pooling,
                     device=args.device, progress=not args.no_progress)
    print(f"encoded {len(vectors)} structures of {args.candidates} as {vectors.shape[1]}-dim vectors "
          f"({args.pooling} node features of {args.model} at fidelity {fidelity})")
    if args.save_vectors:
        Path(args.save_vectors).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_vectors, vectors)
    selection = sample(vectors, args.n, args.method, seed=args.seed, **options)
    pca = selection.pca if selection.pca is not None else principal_components(vectors)
    info, ratio = selection.info, pca.explained_ratio
    if args.method == "direct":
        kept = pca.n_components
        rule = "Kaiser's rule, eigenvalue > 1" if args.pcs == "kaiser" else "--pcs"
        print(f"PCA: {kept} of {len(ratio)} components kept ({rule}), explaining "
              f"{100 * ratio[:kept].sum():.1f}% of the variance; leading eigenvalues "
              f"{np.round(pca.eigenvalues[:kept + 2], 3).tolist()}")
        print(f"BIRCH: {info['n_clusters']} clusters (threshold {info['threshold']:.4g}), "
              f"k={info['k']} per cluster, pick {info['pick']}")
    else:
        print(f"PC1 and PC2 explain {100 * ratio[0]:.1f}% and {100 * ratio[1:2].sum():.1f}% of the variance")
    if args.method == "narrow":
        print(f"narrow region {args.region}: {info['n_inside']} of {len(vectors)} candidates inside")
    out = Path(args.output)
    _write_frames(out, frames, numbers, selection.indices)
    plot = Path(args.plot) if args.plot else out.with_name(f"{out.stem}_pca.png")
    plot_selection(selection, plot, pca=pca, title=f"{args.method}: {len(selection.indices)} of {len(vectors)} "
                   f"({Path(args.candidates).name})")
    print(f"selected {len(selection.indices)} of {len(vectors)} structures ({args.method}, seed {args.seed}); "
          f"written to {out} (frame numbers in info['{INDEX_KEY}']), plot {plot}")


def add_parsers(sub) -> None:
    """Add ``sample`` to an argparse subparsers object."""
    p = sub.add_parser(
        "sample", help="choose structures to label at the high level (DIRECT, random, narrow)",
        description="Encode candidate structures with a trained model (mean invariant node features after "
        "the last interaction), then select --n of them: 'direct' (standardise, PCA with Kaiser's rule, "
        "BIRCH clusters, k per cluster; Qi et al. 2024), 'random', or 'narrow' (at random inside a box in "
        "PC space, e.g. --region 'PC1<-2.5,PC2<0'). Writes the selected frames as extxyz with their frame "
        "number in the candidates file in info['source_index'], and a PC1-PC2 plot.")
    p.add_argument("model", help="model file (model.pt) written by mfmlip train")
    p.add_argument("candidates", help="ASE-readable file of candidate structures (labels are not needed)")
    p.add_argument("--n", type=types.positive_int, help="number of structures to select")
    p.add_argument("--method", choices=METHODS, default="direct")
    p.add_argument("-o", "--output", required=True, help="extxyz file for the selected frames")
    p.add_argument("--plot", help="PC1-PC2 PNG (default OUTPUT-stem_pca.png next to OUTPUT)")
    p.add_argument("--seed", type=types.integer, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--index", type=types.ase_index, default=":", help="ASE index of the candidate frames (default all)")
    p.add_argument("--fidelity", help="fidelity to run the model at (default: the model's first)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="'mean' over all atoms, or 'species': also the mean over each species, concatenated")
    p.add_argument("--batch-size", type=types.positive_int, default=256, help="structures per forward pass")
    p.add_argument("--device", type=types.device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--save-vectors", help="also save the (n_candidates, dim) vectors as .npy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("direct")
    g.add_argument("--n-clusters", type=types.positive_int, help="BIRCH clusters (default: n / k)")
    g.add_argument("--k", type=types.positive_int, help="structures per cluster (default 1, or n / n-clusters)")
    g.add_argument("--pcs", type=types.pcs, default="kaiser",
                   help="principal components kept: 'kaiser' (eigenvalue > 1, the default) or a number")
    g.add_argument("--no-pc-weights", action="store_true",
                   help="cluster on raw PC scores instead of scores weighted by explained variance")
    g.add_argument("--pick", choices=PICKS, default="center",
                   help="within a cluster: closest to the centroid first, or at random")
    g.add_argument("--threshold", type=types.positive_float, help="BIRCH subcluster radius (default: searched)")
    g = p.add_argument_group("narrow")
    g.add_argument("--region", help="box in PC space (unweighted scores, as on the plot), "
                   "e.g. 'PC1<-2.5,PC2>0'")
    p.set_defaults(func=_sample)
