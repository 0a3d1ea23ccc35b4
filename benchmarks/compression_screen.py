"""Single-seed screening of sparse-training ideas (the "tried and dropped" notes in BENCHMARKS.md).

Cheaper than compression.py: no wire framing, no ResidualStore files, no job limits, plain FedAvg weighting;
the same LocalTrainer, codecs and data. Each argument is one JSON config, e.g.

    nice -n 10 python benchmarks/compression_screen.py '{"density": 0.01, "values": "int8", "warmup": 6}'

keys: density, values, ef, server (avg|mom), beta, eta, warmup (rounds), d0 (warm-up start density),
mc (client momentum correction factor, DGC), stats_mode (fresh|ef), stats (codec key: float16|int8|float32,
dense BatchNorm-statistics block outside the top-k budget), lr, epochs, alpha, clients, per_round,
rounds, seeds. Results are single runs: use them to pick candidates, not to claim anything.
"""
import sys, time, json, math
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
import numpy as np, torch
from torch.utils.data import Subset
from edge_sdk import params
from edge_sdk.data import dirichlet_partition, load_digits_split
from edge_sdk.models import build_model
from edge_sdk.protocol import codecs
from edge_sdk.protocol.modelfile import flatten, layout_sizes, unflatten
from edge_sdk.trainer import LocalTrainer
from edge_sdk.update import statistics_mask

torch.set_num_threads(1)
TRAIN, TEST = load_digits_split()

def run(alpha=0.5, clients=10, per_round=10, rounds=20, seed=0, density=0.01, values='int8', ef=True,
        server='avg', beta=0.9, eta=1.0, warmup=0, mc=0.0, lr=0.05, epochs=2, stats_mode='fresh', d0=0.25,
        stats_block=None, **kw):
    torch.manual_seed(seed)
    shards = dirichlet_partition(TRAIN.tensors[1].numpy(), clients, alpha, seed=seed)
    model = build_model('small_cnn', 10, 1)
    tmpl = params.state_to_arrays(model); sizes = layout_sizes(tmpl); g = flatten(tmpl)
    stats = statistics_mask(tmpl)
    tr = LocalTrainer(device='cpu'); rng = np.random.default_rng(seed)
    res = {}; mom = {}; m = np.zeros_like(g, dtype=np.float64); accs = []; nsent = []; nbytes = []
    for rnd in range(1, rounds+1):
        chosen = rng.choice(clients, per_round, replace=False)
        d = density if rnd > warmup else max(density, d0 * (density/d0) ** ((rnd-1)/max(1,warmup)))
        tot = np.zeros(g.size); wsum = 0
        for cid in chosen:
            params.load_arrays(model, unflatten(g, tmpl))
            r = tr.train(model, Subset(TRAIN, shards[cid].tolist()), {'epochs': epochs, 'batch_size': 16, 'lr': lr, 'seed': rnd*1000+int(cid)})
            delta = flatten(params.state_to_arrays(model)) - g
            if values == 'dense':
                sent = delta
            else:
                corr = delta.copy()
                if mc > 0:
                    u = mom.setdefault(cid, np.zeros_like(g)); u *= mc; u += delta; corr = u.copy()
                if ef:
                    corr = corr + res.get(cid, 0)
                if stats_mode == 'fresh':
                    corr[stats] = delta[stats]
                spec = {'name': 'topk', 'density': d, 'values': values, 'index_coding': 'rice',
                        **({'stats': stats_block} if stats_block else {})}
                pay, dec = codecs.encode(spec, corr.astype(np.float32), sizes, stats)
                nbytes.append(len(pay))
                sent = dec.to_dense(g.size)
                if ef:
                    res[cid] = corr - sent
                if mc > 0:
                    mask = sent != 0; mom[cid][mask] = 0
                nsent.append(dec.indices.size)
            tot += r.num_samples * sent; wsum += r.num_samples
        delta = tot / wsum
        if server == 'avg':
            g = (g + eta*delta).astype(np.float32)
        elif server == 'mom':
            m = beta*m + delta; g = (g + eta*m).astype(np.float32)
        ag = unflatten(g, tmpl)
        for n in ag:
            if n.endswith('running_var'): ag[n] = np.maximum(ag[n], 0)
        g = flatten(ag)
        params.load_arrays(model, ag)
        accs.append(tr.evaluate(model, TEST)['accuracy'])
    return accs, (np.mean(nbytes) if nbytes else 0)

if __name__ == '__main__':
    cfgs = [json.loads(a) for a in sys.argv[1:]]
    for c in cfgs:
        t = time.time(); accs = []
        for s in c.pop('seeds', [0]):
            a, nb = run(seed=s, **{('stats_block' if k == 'stats' else k): v for k, v in c.items()}); accs.append(a)
        fin = [a[-1] for a in accs]
        print(json.dumps(c), 'final', ['%.3f' % f for f in fin], 'mean %.4f' % np.mean(fin), 'max', ['%.3f' % max(a) for a in accs], 'payload %.0fB' % nb, '%.0fs' % (time.time()-t), flush=True)
