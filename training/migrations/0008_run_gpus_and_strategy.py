# A run asks for a number of GPUs (the processes it had, carried over) and a multi-GPU strategy.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("training", "0007_dawid_skene_aggregation"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="trainingrun",
            name="trainingrun_at_least_one_process",
        ),
        migrations.RenameField(
            model_name="trainingrun",
            old_name="num_processes",
            new_name="gpus",
        ),
        migrations.AlterField(
            model_name="trainingrun",
            name="gpus",
            field=models.PositiveSmallIntegerField(
                default=1,
                help_text="GPUs the run takes from its worker, one process each (CPU processes on a worker without GPUs).",
                verbose_name="GPUs",
            ),
        ),
        migrations.AddField(
            model_name="trainingrun",
            name="distributed",
            field=models.CharField(
                choices=[
                    ("ddp", "DDP (a full copy of the model per GPU)"),
                    ("fsdp", "FSDP (parameters sharded across GPUs)"),
                    ("deepspeed_zero2", "DeepSpeed ZeRO-2 (optimizer state and gradients sharded)"),
                    ("deepspeed_zero3", "DeepSpeed ZeRO-3 (parameters sharded too)"),
                ],
                default="ddp",
                help_text="How several processes share the work (accelerate's configuration); unused with one GPU.",
                max_length=16,
                verbose_name="multi-GPU strategy",
            ),
        ),
        migrations.AddConstraint(
            model_name="trainingrun",
            constraint=models.CheckConstraint(
                condition=models.Q(("gpus__gte", 1)), name="trainingrun_at_least_one_gpu"
            ),
        ),
    ]
