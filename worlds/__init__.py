"""The simulated worlds the experiments run in, as gym is to cleanrl: data, engines and face networks. The trainers
beside this folder import them and hold only their paper's method."""
