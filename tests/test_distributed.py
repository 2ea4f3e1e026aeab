"""torch_utils.distributed: a process group exists after init(), with or without torchrun."""

import subprocess
import sys
import textwrap

from torch_utils import distributed as dist

SCRIPT = textwrap.dedent('''
    import torch
    from torch_utils import distributed as dist
    dist.init(); dist.init()  # idempotent
    t = torch.tensor([float(dist.get_rank() + 1)])
    torch.distributed.all_reduce(t)
    print(dist.get_rank(), dist.get_world_size(), int(t.item()), dist.default_device().type)
    dist.barrier()
''')


def _run(env_extra, subprocess_env):
    env = dict(subprocess_env, **env_extra)
    return subprocess.Popen([sys.executable, '-c', SCRIPT], env=env, stdout=subprocess.PIPE, text=True)


def test_single_process_group(subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')}
    out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, stdout=subprocess.PIPE, text=True, check=True)
    assert out.stdout.split() == ['0', '1', '1', 'cpu']


def test_two_ranks_env_rendezvous(subprocess_env):
    port = dist.free_port()
    procs = [_run(dict(WORLD_SIZE='2', RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR='127.0.0.1',
                       MASTER_PORT=str(port)), subprocess_env) for r in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].split()[:3] for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == [['0', '2', '3'], ['1', '2', '3']]  # 1 + 2 summed on both ranks
