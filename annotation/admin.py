from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import Group
from django.forms import ModelForm
from django.http import HttpRequest

from annotation.roles import Role
from annotation.services import user_sync_staff

User = get_user_model()

# Fields only a superuser may change: a manager creating accounts must not be
# able to grant more than the roles themselves.
_SUPERUSER_ONLY_FIELDS = ("is_superuser", "is_staff", "user_permissions")


class RankwiseUserAdmin(UserAdmin):
    list_display = ("username", "email", "roles", "is_active", "last_login")
    list_filter = ("groups", "is_active")

    @admin.display(description="roles")
    def roles(self, obj: Any) -> str:
        return ", ".join(sorted(group.name for group in obj.groups.all()))

    def get_queryset(self, request: HttpRequest) -> Any:
        queryset = super().get_queryset(request).prefetch_related("groups")
        if not request.user.is_superuser:  # type: ignore[union-attr]
            # Otherwise a manager could reset a superuser's password and become one.
            queryset = queryset.filter(is_superuser=False)
        return queryset

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = tuple(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:  # type: ignore[union-attr]
            readonly += _SUPERUSER_ONLY_FIELDS
        return readonly

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "groups" and not request.user.is_superuser:  # type: ignore[union-attr]
            kwargs["queryset"] = Group.objects.filter(name__in=Role.values)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def save_related(self, request: HttpRequest, form: ModelForm, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        user_sync_staff(user=form.instance)  # type: ignore[arg-type]


admin.site.unregister(User)
admin.site.register(User, RankwiseUserAdmin)
